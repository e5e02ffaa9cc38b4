#!/usr/bin/env bash
# Vendor MathJax into docs/javascripts/vendor/mathjax so that the site renders its formulas
# offline (no CDN). Source: the npm registry's `mathjax` package, pinned by version and checksum.
# Copies the combined TeX+MathML -> CommonHTML component, its WOFF fonts and MathJax's license.
# Re-run after changing MATHJAX_VERSION (and update MATHJAX_SHA256 to the new tarball's).
set -euo pipefail
MATHJAX_VERSION=3.2.2
MATHJAX_SHA256=1b9c0a1c44df864e915690558e72adb9cc5203360daefd385084ced3b6c64c09
cd "$(dirname "$0")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "mathjax@$MATHJAX_VERSION" > /dev/null)
echo "$MATHJAX_SHA256  $work/mathjax-$MATHJAX_VERSION.tgz" | sha256sum --check --quiet
tar -xzf "$work/mathjax-$MATHJAX_VERSION.tgz" -C "$work"
dest=javascripts/vendor/mathjax
rm -rf "$dest"
mkdir -p "$dest/output/chtml/fonts"
cp "$work/package/es5/tex-mml-chtml.js" "$work/package/LICENSE" "$dest/"
cp -r "$work/package/es5/output/chtml/fonts/woff-v2" "$dest/output/chtml/fonts/"
echo "MathJax $MATHJAX_VERSION (npm package mathjax, Apache-2.0), vendored by docs/vendor_mathjax.sh" \
  > "$dest/VERSION"
echo "vendored MathJax $MATHJAX_VERSION into docs/$dest"
