#!/bin/sh
# Assemble the image's root filesystem apart from the virtualenv: the Python
# interpreter the venv points at, its standard library without what a TLS
# daemon never imports, exactly the shared libraries the dynamic loader
# resolves for the interpreter and every extension module (the stdlib's and
# the venv's), and the few files of /etc a process expects. No shell, no
# package manager, no compiler: what the distroless images ship, from
# Debian's own files, so Debian's security updates still apply on rebuild.
#
# usage: runtime-tree.sh VENV DEST      (run in the image's build stage)
set -eu

venv=$1
dest=$2
uid=65532 # distroless's "nonroot", the image's USER

python=$(readlink -f "$venv/bin/python3")
stdlib=$("$python" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')
multiarch=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("MULTIARCH"))')

# Debian's merged /usr: /lib, /lib64 and /bin are links into /usr, so the
# loader path baked into every binary (/lib64/ld-linux-*.so.*) resolves.
mkdir -p "$dest/usr/bin" "$dest/usr/lib/$multiarch" "$dest/usr/lib64"
ln -s usr/bin "$dest/bin"
ln -s usr/lib "$dest/lib"
ln -s usr/lib64 "$dest/lib64"

cp -p "$python" "$dest$python"
ln -s "$(basename "$python")" "$dest/usr/bin/python3" # the venv's bin/python3 target

mkdir -p "$dest$stdlib"
cp -a "$stdlib/." "$dest$stdlib/"
# Never imported by the daemon: the test suite, IDEs, GUIs, installers,
# databases and terminals (whose extension modules would pull in Kerberos,
# Berkeley DB, SQLite and ncurses), and the static library for embedding.
for unused in test idlelib tkinter turtledemo turtle.py ensurepip lib2to3 \
    pydoc_data distutils venv sqlite3 dbm curses "config-"*; do
    rm -rf "${dest:?}$stdlib/"$unused
done
for unused in _curses _curses_panel readline nis _dbm _gdbm _sqlite3 _tkinter \
    _ctypes_test _testcapi _testbuffer _testimportmultiple _testinternalcapi \
    _testmultiphase _testclinic _xxsubinterpreters _xxtestfuzz xxlimited \
    xxlimited_35 audioop; do
    rm -f "$dest$stdlib/lib-dynload/$unused".*.so
done

# Every shared library the loader resolves, copied under the name it looks
# for (the soname), into the directory it finds it in. libgcc_s is loaded by
# glibc at run time (dlopen, for thread cancellation), not linked, so ldd
# cannot see it.
libs=$(mktemp)
find "$dest$python" "$dest$stdlib/lib-dynload" "$venv" -type f \( -name '*.so*' -o -perm -u+x \) \
    -exec ldd {} \; 2>/dev/null |
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' >"$libs"
echo "/lib/$multiarch/libgcc_s.so.1" >>"$libs"
sort -u "$libs" | while read -r lib; do
    case $lib in "$venv"/*) continue ;; esac # shipped in the venv's own layer
    dir=$(cd "$(dirname "$lib")" && pwd -P)
    mkdir -p "$dest$dir"
    cp -L "$lib" "$dest$dir/$(basename "$lib")"
done
rm -f "$libs"

# /etc: the image's users, for getpwuid(); name resolution from /etc/hosts
# (which the runtime mounts) before DNS.
# The mount points a container runtime mounts over (the root stays read-only).
mkdir -p "$dest/proc" "$dest/dev" "$dest/sys"
mkdir -p "$dest/etc/tlsproxy/tls" "$dest/tmp" "$dest/run/tlsproxy/state" "$dest/run/tlsproxy/metrics"
chmod 1777 "$dest/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%s:%s:nonroot:/run/tlsproxy:/sbin/nologin\n' \
    "$uid" "$uid" >"$dest/etc/passwd"
printf 'root:x:0:\nnonroot:x:%s:\n' "$uid" >"$dest/etc/group"
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$dest/etc/nsswitch.conf"
chown -R "$uid:$uid" "$dest/run/tlsproxy"
