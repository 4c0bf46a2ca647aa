#!/usr/bin/env bash
# PostgreSQL's server programs from Debian's packages, unless they are already here. The tests start a server of
# their own (tests/services.py), so the cluster Debian's package would make and start is turned off first, as the
# official postgres image does.
set -euo pipefail
if command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq postgresql-common >/dev/null
sed -ri 's/#?(create_main_cluster) .*$/\1 = false/' /etc/postgresql-common/createcluster.conf
apt-get install -y -qq postgresql >/dev/null
