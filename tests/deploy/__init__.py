"""Helpers for the tests of deploy/, Dockerfile and the image's install steps."""
