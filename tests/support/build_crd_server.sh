#!/usr/bin/env bash
# Build the real CRD API server the `crdserver` tests run against (tests/support/apiserver.py):
#   bash tests/support/build_crd_server.sh OUTDIR      ->  OUTDIR/etcd, OUTDIR/apiextensions-apiserver, OUTDIR/apishim
#   pytest -m crdserver --crd-server OUTDIR
#   python -m bench.operator_scale --crd-server OUTDIR   (apishim, bench/apishim: the core kinds on it)
#
# Everything comes from Debian unstable through apt, into a private apt folder (the system's apt
# configuration and installed packages are not touched, no root needed): etcd-server (a binary),
# Go, and k8s.io/apiextensions-apiserver with all it imports as Debian Go source packages
# (golang-*-dev). Go then builds the server's main package in GOPATH mode. About 400 MB of
# packages, and about 5 CPU-minutes for the build (10 to 30 min wall on 2 shared cores).
#
# Why not kube-apiserver: none of the registries these machines reach ships it (looked at: PyPI and
# npm for kube-apiserver, envtest / setup-envtest, kwok, k3s, k0s, kine, minikube, kind; Debian
# for the `kubernetes` source package, which builds only kubectl, and whose source is not served
# here anyway). apiextensions-apiserver is the part of kube-apiserver that serves CRDs.
set -euo pipefail

out=$(realpath -m "${1:?usage: build_crd_server.sh OUTDIR}")
work=${CRD_SERVER_WORK:-$out/.build}
mkdir -p "$out" "$work/apt/lists/partial" "$work/apt/cache/archives/partial" "$work/root"

# The Debian mirror this machine's apt already uses.
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
if [ -z "$mirror" ]; then
  mirror=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' /etc/apt/sources.list 2>/dev/null || true)
fi
[ -n "$mirror" ] || { echo "build_crd_server.sh: no Debian mirror found in /etc/apt" >&2; exit 1; }

echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" > "$work/apt/sources.list"
: > "$work/apt/status"   # an empty dpkg status: download every dependency, whatever this system has
apt_opts=(
  -o "Dir::Etc::SourceList=$work/apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
  -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache" -o "Dir::State::status=$work/apt/status"
  -o APT::Install-Recommends=false -o Debug::NoLocking=1 -o APT::Sandbox::User="$(id -un)"
)
apt-get "${apt_opts[@]}" -q update
apt-get "${apt_opts[@]}" -q -y install --download-only golang-go golang-k8s-apiextensions-apiserver-dev etcd-server >"$work/download.log"

for deb in "$work"/apt/cache/archives/golang-*.deb "$work"/apt/cache/archives/etcd-server_*.deb; do
  dpkg-deb -x "$deb" "$work/root"
done
(cd "$work/apt/cache/archives" && ls golang-1.*-go_*.deb golang-k8s-apiextensions-apiserver-dev_*.deb etcd-server_*.deb) > "$out/VERSIONS"

goroot=$(ls -d "$work"/root/usr/lib/go-1.* | sort -V | tail -1)
export GOROOT=$goroot GOPATH=$work/root/usr/share/gocode GO111MODULE=off CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=
export GOCACHE=${GOCACHE:-$work/gocache}
(cd "$GOPATH/src/k8s.io/apiextensions-apiserver" && "$GOROOT/bin/go" build -trimpath -o "$out/apiextensions-apiserver" .)
(cd "$(dirname "$0")/../../bench/apishim" && "$GOROOT/bin/go" build -trimpath -o "$out/apishim" .)
cp "$work/root/usr/bin/etcd" "$out/etcd"
"$out/etcd" --version | head -1
"$out/apiextensions-apiserver" --version 2>/dev/null || true
echo "built into $out:"; cat "$out/VERSIONS"
