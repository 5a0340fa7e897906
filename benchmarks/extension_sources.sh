# Sourced by prebuild_extension.sh and device_setup.sh: where the library built beforehand lies,
# and the hash of everything the extension is built from, so one built from other sources is
# never used.
prebuilt_extension=magma_ext/_C.cpython-312-x86_64-linux-gnu.so
extension_sources_sha1() {
  find csrc setup.py -type f | LC_ALL=C sort | xargs sha1sum | sha1sum | cut -c1-40
}
