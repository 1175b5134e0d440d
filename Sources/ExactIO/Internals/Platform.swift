// The C library, imported once for the whole module (Glibc on Linux, Musl for static Linux
// builds, Darwin elsewhere): every file sees the same system interfaces, and no file repeats
// the block. Re-exported, as Foundation re-exports it: code that imports ExactIO sees the C
// library too.
#if canImport(Glibc)
@_exported import Glibc
#elseif canImport(Musl)
@_exported import Musl
#elseif canImport(Darwin)
@_exported import Darwin
#endif
