#!/bin/sh
# Random secrets for deploy/compose.yaml, one file each in deploy/secrets/.
# Existing files are kept, so running this again changes nothing.
#
# The directory is 0700 (no other user of this host can read inside it); the files
# are 0644 because compose bind-mounts them into containers whose unprivileged users
# (nexus 10001, postgres 999) must read them. deploy/secrets/.gitignore keeps them
# out of git.
set -eu

dir="$(cd "$(dirname "$0")" && pwd)/secrets"
mkdir -p "$dir"
chmod 700 "$dir"

token() {  # N random letters and digits (NATS reads the passwords as bare words)
    LC_ALL=C tr -dc 'A-Za-z0-9' < /dev/urandom | head -c "$1"
}

make_secret() {  # FILE PREFIX
    file="$dir/$1"
    if [ -s "$file" ]; then
        echo "kept     $file"
        return
    fi
    (umask 077 && printf '%s%s\n' "$2" "$(token 40)" > "$file")
    chmod 644 "$file"
    echo "created  $file"
}

make_secret nexus_admin_key nx_admin_
make_secret postgres_password pg
make_secret nats_orchestrator_password nats
make_secret nats_provider_password nats
make_secret nats_node_password nats

echo
echo "The platform admin API key (send it as 'Authorization: Bearer <key>'):"
echo "  cat $dir/nexus_admin_key"
