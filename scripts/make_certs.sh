#!/usr/bin/env bash
# Certificates and keys for a TLS-secured Flower deployment with SuperNode authentication.
#
#   scripts/make_certs.sh OUT_DIR SUPERLINK_HOST [NUM_NODES]
#   scripts/make_certs.sh certs superlink.example.org 10
#
# OUT_DIR/ca.crt             CA certificate: give it to every SuperNode (--root-certificates)
#                            and to the `flwr` CLI (root-certificates in config.toml)
# OUT_DIR/ca.key             CA private key: keep it offline
# OUT_DIR/server.{crt,key}   the SuperLink's certificate (SAN = SUPERLINK_HOST) and key
# OUT_DIR/nodeK, nodeK.pub   SuperNode K's ECDSA P-384 key pair (node authentication): the
#                            private key stays on node K, the .pub is registered on the SuperLink
#                            with `flwr supernode register OUT_DIR/nodeK.pub <connection>`
# For testing only; production certificates come from your organisation's CA. See
# docs/deployment.md.
set -euo pipefail

OUT=${1:?usage: make_certs.sh OUT_DIR SUPERLINK_HOST [NUM_NODES]}
HOST=${2:?usage: make_certs.sh OUT_DIR SUPERLINK_HOST [NUM_NODES]}
N=${3:-2}
mkdir -p "$OUT"
umask 077

if [[ $HOST =~ ^[0-9.]+$ || $HOST == *:* ]]; then SAN="IP:$HOST"; else SAN="DNS:$HOST"; fi
[ "$HOST" != localhost ] && [ "$HOST" != 127.0.0.1 ] && SAN="$SAN,IP:127.0.0.1,DNS:localhost"

openssl req -x509 -newkey rsa:4096 -sha256 -days 365 -nodes -subj "/CN=fedpeft test CA" \
  -keyout "$OUT/ca.key" -out "$OUT/ca.crt" 2>/dev/null
openssl req -newkey rsa:4096 -sha256 -nodes -subj "/CN=$HOST" \
  -keyout "$OUT/server.key" -out "$OUT/server.csr" 2>/dev/null
openssl x509 -req -sha256 -days 365 -in "$OUT/server.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" \
  -CAcreateserial -out "$OUT/server.crt" \
  -extfile <(printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\n" "$SAN") 2>/dev/null
rm -f "$OUT/server.csr" "$OUT/ca.srl"

for ((k = 0; k < N; k++)); do
  rm -f "$OUT/node$k" "$OUT/node$k.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedpeft-node$k" -f "$OUT/node$k"
done
chmod 644 "$OUT/ca.crt" "$OUT/server.crt" "$OUT"/node*.pub
echo "wrote $OUT: ca.crt ca.key server.crt server.key (SAN $SAN) and $N node key pairs"
