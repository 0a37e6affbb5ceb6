#!/bin/sh
# The bus's own RabbitMQ user, with only the rights it needs (compose's rabbitmq-setup).
#
# Runs in the rabbitmq:3.13-management image (it ships rabbitmqadmin and python3) and
# talks to the node's management API as RabbitMQ's administrator. Idempotent: `declare`
# replaces the user's password and tags and the permissions. The bus's user gets:
#   tags         none (not administrator, not impersonator: RabbitMQ checks its user_id)
#   configure    ^PREFIX\..*                      declare its queues and exchanges
#   write        ^(PREFIX\..*|amq\.default)$      publish to its exchanges; `dlq replay`
#                                                 publishes through the default exchange
#   read         ^PREFIX\..*                      consume its queues, bind to its exchanges
#   topic        none (no restriction: it publishes with any partner as routing key)
# Partners' users are made by `partnerbus access apply|export` (docs/ACCESS.md).
set -eu

: "${RABBITMQ_ADMIN_PASSWORD:?set the administrator's password}"
: "${PARTNERBUS_RABBITMQ_PASSWORD:?set the bus's AMQP password}"
admin_user=${RABBITMQ_ADMIN_USER:-admin}
bus_user=${PARTNERBUS_RABBITMQ_USER:-partnerbus}
prefix=${PARTNERBUS_PREFIX:-partnerbus}
host=${RABBITMQ_HOST:-rabbitmq}
vhost=${RABBITMQ_VHOST:-/}

case $prefix in
  *[!a-z0-9._-]* | "") echo "PARTNERBUS_PREFIX must match [a-z0-9._-]+" >&2; exit 64 ;;
esac
# The prefix as a regular expression: only its dots are special.
p=$(printf '%s' "$prefix" | sed 's/\./\\./g')

# The administrator's credentials go in a private config file, not on a command line.
config=$(mktemp)
trap 'rm -f "$config"' EXIT
chmod 600 "$config"
cat >"$config" <<CONF
[default]
hostname = $host
port = 15672
username = $admin_user
password = $RABBITMQ_ADMIN_PASSWORD
vhost = $vhost
CONF
admin() { rabbitmqadmin --config "$config" --node default "$@"; }

# The management listener may open a moment after the AMQP port: a bounded wait.
tries=0
until admin --quiet list users >/dev/null 2>&1; do
  tries=$((tries + 1))
  if [ "$tries" -ge 30 ]; then
    echo "the management API of $host did not answer as $admin_user" >&2
    exit 1
  fi
  sleep 2
done

admin declare user name="$bus_user" password="$PARTNERBUS_RABBITMQ_PASSWORD" tags=""
admin declare permission vhost="$vhost" user="$bus_user" \
  configure="^$p\\..*" write="^($p\\..*|amq\\.default)\$" read="^$p\\..*"
echo "user $bus_user: no tags; configure/read ^$p\\..*, write ^($p\\..*|amq\\.default)\$ on $vhost"
