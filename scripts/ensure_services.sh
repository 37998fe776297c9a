#!/usr/bin/env bash
# Make PostgreSQL, Redis and Mosquitto available on loopback for the tests that need them.
# Already running: nothing to do. Installed but stopped: start them. Absent: install them from
# Debian's packages when running as root with apt (set TESSERA_NO_APT=1 to skip); otherwise the
# tests skip those variants and say why.
set -u
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! listening 5432 || ! listening 6379; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ "${TESSERA_NO_APT:-0}" != 1 ]; then
    need=()
    command -v pg_ctlcluster >/dev/null || need+=(postgresql)
    command -v redis-server >/dev/null || need+=(redis-server)
    if [ ${#need[@]} -gt 0 ]; then
      echo "ensure_services: installing ${need[*]} from Debian packages"
      timeout 600 apt-get update -qq && timeout 900 apt-get install -y -qq "${need[@]}" >/dev/null
    fi
  fi
fi

# DICOM tools for the nodule tests: dcmtk (storescu/storescp) and Orthanc (a real PACS). Installed
# only; the tests start their own on loopback and skip, saying why, when they are absent.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ "${TESSERA_NO_APT:-0}" != 1 ]; then
  dicom_need=()
  command -v storescu >/dev/null || dicom_need+=(dcmtk)
  command -v Orthanc >/dev/null || dicom_need+=(orthanc)
  if [ ${#dicom_need[@]} -gt 0 ]; then
    echo "ensure_services: installing ${dicom_need[*]} from Debian packages"
    timeout 600 apt-get update -qq && timeout 900 apt-get install -y -qq "${dicom_need[@]}" >/dev/null
  fi
fi

# The HTTP load generator of the benchmarks (bench/runtime.py, bench/fraud_sqlite_wrk.py): wrk.
# Installed only; no test needs it.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ "${TESSERA_NO_APT:-0}" != 1 ]; then
  if ! command -v wrk >/dev/null; then
    echo "ensure_services: installing wrk from Debian packages"
    timeout 600 apt-get update -qq && timeout 900 apt-get install -y -qq wrk >/dev/null
  fi
fi

# Speech synthesis for the customer-service simulator and tests: espeak-ng. Installed only; the
# tests that speak skip, saying why, when it is absent.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ "${TESSERA_NO_APT:-0}" != 1 ]; then
  if ! command -v espeak-ng >/dev/null; then
    echo "ensure_services: installing espeak-ng from Debian packages"
    timeout 600 apt-get update -qq && timeout 900 apt-get install -y -qq espeak-ng >/dev/null
  fi
  # The acoustic adaptation (`tessera train cs acoustic`) and its test: sphinxtrain's bw and
  # map_adapt, sphinxbase's sphinx_fe, pocketsphinx's pocketsphinx_mdef_convert. Serving needs
  # none of them (the adapted model ships).
  asr_need=()
  [ -x /usr/lib/sphinxtrain/bw ] || asr_need+=(sphinxtrain)
  command -v sphinx_fe >/dev/null || asr_need+=(sphinxbase-utils)
  command -v pocketsphinx_mdef_convert >/dev/null || asr_need+=(pocketsphinx)
  if [ ${#asr_need[@]} -gt 0 ]; then
    echo "ensure_services: installing ${asr_need[*]} from Debian packages"
    timeout 600 apt-get update -qq && timeout 900 apt-get install -y -qq "${asr_need[@]}" >/dev/null
  fi
fi

# MQTT broker for the IIoT tests: Mosquitto on loopback 1883 (installed and started when absent;
# the tests that need it skip, saying why, otherwise).
if ! listening 1883; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ "${TESSERA_NO_APT:-0}" != 1 ] \
      && ! command -v mosquitto >/dev/null; then
    echo "ensure_services: installing mosquitto from Debian packages"
    timeout 600 apt-get update -qq && timeout 900 apt-get install -y -qq mosquitto >/dev/null
  fi
  if command -v mosquitto >/dev/null; then
    echo "ensure_services: starting mosquitto on 127.0.0.1:1883"
    mosquitto -d -p 1883 || true
  fi
fi

if ! listening 5432 && command -v pg_ctlcluster >/dev/null; then
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$version" ]; then
    conf=/etc/postgresql/$version/main/pg_hba.conf
    # The tests connect as postgres over TCP without a password (trust on loopback only).
    grep -q "tessera-test" "$conf" 2>/dev/null || sed -i '1i host all all 127.0.0.1/32 trust # tessera-test' "$conf"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    su postgres -c "psql -tc \"SELECT 1 FROM pg_database WHERE datname='test'\" | grep -q 1 || createdb test" 2>/dev/null || true
  fi
fi
if ! listening 6379 && command -v redis-server >/dev/null; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null || true
fi
for i in $(seq 1 30); do listening 5432 && listening 6379 && break; sleep 0.5; done
listening 5432 && echo "ensure_services: PostgreSQL up on 127.0.0.1:5432" || echo "ensure_services: PostgreSQL unavailable: its test variants will be skipped"
listening 6379 && echo "ensure_services: Redis up on 127.0.0.1:6379" || echo "ensure_services: Redis unavailable: its test variants will be skipped"
exit 0
