# Sourced by prebuild_extension.sh and device_setup.sh: the hash of everything the extension is
# built from, so a library built from other sources is never used.
extension_sources_sha1() {
  find csrc setup.py -type f | LC_ALL=C sort | xargs sha1sum | sha1sum | cut -c1-40
}
