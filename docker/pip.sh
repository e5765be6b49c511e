#!/bin/sh
# pip during an image build: it trusts the CA bundle that `make images` copied from the host's pip
# (docker/local/ca/ca-certificates.crt), where the host reaches PyPI through a TLS proxy whose
# root the base image lacks; without one, the base image's own bundle.
set -e
bundle=/opt/build/ca/ca-certificates.crt
if [ -s "$bundle" ]; then export PIP_CERT="$bundle"; fi
exec pip "$@"
