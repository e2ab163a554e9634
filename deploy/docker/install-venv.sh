#!/bin/sh
# Install tlsproxy and its pinned runtime dependencies into a fresh virtualenv.
#
# The image's build stage runs this script, and so does
# tests/test_deploy_image.py (as a non-root user, from a read-only source
# tree), so the two cannot drift apart.
#
# usage: install-venv.sh SOURCE_TREE PREFIX
set -eu

src=$1
prefix=$2

# setuptools writes build/ and *.egg-info into the tree it builds, so build
# from a private copy: the source may be read-only (a test, a bind mount).
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/src"
cp -R "$src/pyproject.toml" "$src/README.md" "$src/proxy" "$work/src/"
chmod -R u+w "$work/src" # cp keeps a read-only source's modes
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +

# The venv gets no pip and no setuptools (22 MiB the daemon never imports):
# a throwaway venv's pip installs into it (`pip --python`). No pip cache: it
# would only bloat the layer. pip compiles the bytecode here, at install
# time, because the runtime tree is read-only.
python3 -m venv --without-pip "$prefix"
python3 -m venv "$work/installer"
"$work/installer/bin/pip" --python "$prefix/bin/python" install \
    --no-cache-dir --disable-pip-version-check --quiet "$work/src"
