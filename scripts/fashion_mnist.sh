#!/usr/bin/env bash
# Fashion-MNIST for spvit-nas (`dataset: fashion-mnist`): Debian's `dataset-fashion-mnist` package
# puts the four standard IDX files in /usr/share/datasets/fashion-mnist.
#
#   scripts/fashion_mnist.sh install
#       Install the package if the files are missing (idempotent; apt-get as root or via sudo).
#       Where that is not possible, says in one line how to get the data and exits 2.
#   scripts/fashion_mnist.sh check
#       Exit 0 if the four files are present, else say how to get them and exit 2.
set -euo pipefail

DIR=/usr/share/datasets/fashion-mnist
FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)
HOWTO="install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist), or put the four IDX files in a folder and use dataset: fashion-mnist:PATH"

present() {
    local f
    for f in "${FILES[@]}"; do
        [[ -f "$DIR/$f.gz" || -f "$DIR/$f" ]] || return 1
    done
}

cmd_install() {
    if present; then echo "Fashion-MNIST present in $DIR"; return; fi
    local sudo=""
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && sudo="sudo" || {
            echo "fashion_mnist.sh: Fashion-MNIST is not in $DIR and installing needs root: $HOWTO" >&2
            exit 2; }
    fi
    command -v apt-get >/dev/null 2>&1 || {
        echo "fashion_mnist.sh: no apt-get on this machine: $HOWTO" >&2; exit 2; }
    $sudo apt-get update -qq >/dev/null || true
    if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            dataset-fashion-mnist >/dev/null; then
        echo "fashion_mnist.sh: apt-get could not install dataset-fashion-mnist: $HOWTO" >&2
        exit 2
    fi
    present || { echo "fashion_mnist.sh: the package installed no files in $DIR: $HOWTO" >&2; exit 2; }
    echo "Fashion-MNIST installed in $DIR"
}

cmd_check() {
    present || { echo "fashion_mnist.sh: Fashion-MNIST is not in $DIR: $HOWTO" >&2; exit 2; }
    echo "Fashion-MNIST present in $DIR"
}

case "${1:-}" in
    install) cmd_install ;;
    check) cmd_check ;;
    *) echo "usage: $0 install|check" >&2; exit 2 ;;
esac
