#!/usr/bin/env bash
# Build the installable packages (release build) into target/packages/:
# - postgresql-15-memory-ext_<version>_<arch>.deb for Debian's PostgreSQL 15 (dpkg -i; no Rust);
# - memory_ext-<version>-pg18-linux-<arch>.tar.gz for PostgreSQL 18 (any install with pg_config:
#   unpack, then run its install.sh, which copies beside and renames, like dpkg).
# Both carry the install scripts of every released version and the upgrade scripts.
#
#   scripts/package.sh [15|18 ...]     (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml)
arch=$(dpkg --print-architecture)
out=target/packages
mkdir -p "$out"

deb() {
    local stage=target/stage/pg15 pkg=postgresql-15-memory-ext
    local root="target/deb/$pkg"
    rm -rf "$root"; mkdir -p "$root/DEBIAN"
    cp -a "$stage/usr" "$root/"
    cat > "$root/DEBIAN/control" <<EOF
Package: $pkg
Version: $version
Architecture: $arch
Maintainer: memory_ext maintainers <maintainers@users.noreply.github.com>
Depends: postgresql-15, libc6
Section: database
Priority: optional
Description: short-term conversation memory for AI chat applications, inside PostgreSQL
 An extension whose background worker merges context snippets, enqueued with SQL, into one
 memory record per chat. Add memory_ext to shared_preload_libraries, restart, then
 CREATE EXTENSION memory_ext in each database that should have it.
EOF
    dpkg-deb --root-owner-group --build "$root" "$out/${pkg}_${version}_${arch}.deb" >/dev/null
    echo "package: $out/${pkg}_${version}_${arch}.deb"
}

tarball() {
    local major=$1 stage=target/stage/pg$1 name="memory_ext-$version-pg$1-linux-$arch"
    local root="target/tar/$name"
    rm -rf "$root"; mkdir -p "$root/lib" "$root/extension"
    find "$stage" -name 'memory_ext*.so' -exec cp {} "$root/lib/" \;
    find "$stage" -path '*/extension/memory_ext*' -exec cp {} "$root/extension/" \;
    cat > "$root/install.sh" <<'EOF'
#!/bin/sh
# Install into the PostgreSQL whose pg_config is first in PATH (or $PG_CONFIG), by copying beside
# each file and renaming over it: a running server keeps the library it loaded until restarted.
set -eu
cd "$(dirname "$0")"
PG_CONFIG=${PG_CONFIG:-pg_config}
lib=$("$PG_CONFIG" --pkglibdir); ext=$("$PG_CONFIG" --sharedir)/extension
for f in lib/*; do cp "$f" "$lib/.$(basename "$f").new" && mv -f "$lib/.$(basename "$f").new" "$lib/$(basename "$f")"; done
for f in extension/*; do cp "$f" "$ext/.$(basename "$f").new" && mv -f "$ext/.$(basename "$f").new" "$ext/$(basename "$f")"; done
echo "memory_ext installed into $lib and $ext"
EOF
    chmod +x "$root/install.sh"
    tar -C target/tar -czf "$out/$name.tar.gz" "$name"
    echo "package: $out/$name.tar.gz"
}

for major in ${@:-15 18}; do
    MEMORY_EXT_PG=$major scripts/install.sh --release --stage-only
    if [[ $major == 15 ]]; then deb; else tarball "$major"; fi
done
