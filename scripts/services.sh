# Sourced by scripts/test: make sure PostgreSQL and Redis answer on 127.0.0.1, starting the
# machine's own servers when they are installed but not running. The integration and
# end-to-end tests use these real servers (each test makes and drops its own database and
# Redis DB number), so the suite needs them.

ensure_services() {
    PG_HOST=127.0.0.1 PG_PORT=5432
    REDIS_HOST=127.0.0.1 REDIS_PORT=6379
    WAIT_S=60

    answers() {  # host port: something accepts TCP connections there
        (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
    }

    wait_for() {  # name host port
        local deadline=$((SECONDS + WAIT_S))
        until answers "$2" "$3"; do
            if ((SECONDS >= deadline)); then
                echo "services: $1 did not answer on $2:$3 within ${WAIT_S}s" >&2
                return 1
            fi
            sleep 1
        done
        echo "services: $1 answers on $2:$3"
    }

    if ! answers "$PG_HOST" "$PG_PORT"; then
        echo "services: starting PostgreSQL"
        command -v pg_ctlcluster >/dev/null || {
            echo "services: PostgreSQL is neither running nor installed; install it or set STILLTAG_TEST_PG" >&2
            return 1
        }
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
    fi
    wait_for PostgreSQL "$PG_HOST" "$PG_PORT"
    if command -v pg_isready >/dev/null; then  # accepting TCP is not yet accepting queries
        deadline=$((SECONDS + WAIT_S))
        until pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; do
            ((SECONDS < deadline)) || { echo "services: PostgreSQL is not ready" >&2; return 1; }
            sleep 1
        done
    fi

    if ! answers "$REDIS_HOST" "$REDIS_PORT"; then
        echo "services: starting Redis"
        command -v redis-server >/dev/null || {
            echo "services: Redis is neither running nor installed; install it or set STILLTAG_TEST_REDIS" >&2
            return 1
        }
        mkdir -p /var/lib/redis /var/log/redis
        redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" \
            --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
    fi
    wait_for Redis "$REDIS_HOST" "$REDIS_PORT"

}
