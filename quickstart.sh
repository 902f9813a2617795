#!/usr/bin/env bash
# encfs quick start, for a fresh Debian 12 machine as root:
#   bash quickstart.sh demo   # install everything, then run the demo on the embedded SoftHSM2 token
#   bash quickstart.sh test   # install everything, then run the whole test suite
#   bash quickstart.sh lint   # install everything, then ruff and mypy (strict) on encfs/
# Extra arguments after `test` go to pytest.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(fuse3 libfuse3-dev pkg-config softhsm2 python3 python3-venv python3-dev gcc
              e2fsprogs util-linux attr fio logrotate
              zsh mandoc groff-base man-db  # tests of `encfs completion` and `encfs man`
              systemd)  # systemd-analyze verify checks contrib/systemd's units (PID 1 need not be systemd)

setup() {
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        echo "== apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if [ ! -x .venv/bin/python ]; then
        echo "== python3 -m venv .venv"
        python3 -m venv .venv
    fi
    echo "== pip install -e '.[test]'"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
}

cmd=${1:-}
case "$cmd" in
    demo)
        setup
        shift
        exec bash scripts/demo.sh "$@"
        ;;
    test)
        setup
        shift
        # Two workers (pytest-xdist; ENCFS_TEST_WORKERS=0 runs in one process): most tests wait on
        # mounts, daemons and the disk, so two run in about half the time on the 2-core VM
        # (docs/dev/testing.md, "Running the suite").
        exec .venv/bin/python -m pytest -n "${ENCFS_TEST_WORKERS:-2}" --dist worksteal "$@"
        ;;
    lint)
        setup
        echo "== ruff check encfs"
        .venv/bin/ruff check encfs
        echo "== mypy encfs (strict: pyproject.toml)"
        exec .venv/bin/mypy encfs
        ;;
    *)
        echo "usage: bash quickstart.sh demo|test|lint" >&2
        exit 2
        ;;
esac
