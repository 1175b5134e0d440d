// swift-tools-version: 6.2
import PackageDescription

// ExactIO: read exactly n bytes from sockets, pipes and files with one copy (the kernel's),
// peak memory n, and a read-only view of the memory the bytes landed in.
//
// `Lifetimes` is needed for the `RawSpan` property of `ByteView`; swift-nio, swift-system and
// swift-collections enable the same experimental feature.
//
// The io_uring part (liburing, the C target ExactIOCSupport, the io_uring reader and loop
// backends) is the package trait `IOUring` (SE-0450), on by default and Linux-only. A dependent
// turns it off in its own manifest:
//
//     .package(url: "https://…/ExactIO", from: "0.1.0", traits: [])
//
// and this package's own build with `swift build --disable-default-traits`. Without it nothing
// includes or links liburing: readers use read(2), loops epoll (or poll(2)). Swift code of the
// io_uring part is under `#if EXACTIO_URING` (defined only for Linux with the trait on), its C
// code under `#ifdef EXACTIO_URING`.
//
// EXACTIO_NO_URING=1 in the environment is a build-machine override with the same effect
// whatever the traits say (and the targets that need liburing are left out altogether).
let withURing = Context.environment["EXACTIO_NO_URING"].map { $0.isEmpty || $0 == "0" } ?? true
let linux: TargetDependencyCondition = .when(platforms: [.linux])!

/// A dependency on a target of the io_uring part: only on Linux, with the `IOUring` trait.
func uringTarget(_ name: String) -> [Target.Dependency] {
    withURing ? [.target(name: name, condition: .when(platforms: [.linux], traits: ["IOUring"]))] : []
}

/// Where the io_uring part is compiled in: Linux with the `IOUring` trait.
let uringCondition: BuildSettingCondition = .when(platforms: [.linux], traits: ["IOUring"])

let swiftSettings: [SwiftSetting] = [
    .enableExperimentalFeature("Lifetimes"),
] + (withURing ? [.define("EXACTIO_URING", uringCondition)] : [])

/// The C targets' settings: warnings are errors; `EXACTIO_URING` as for Swift.
let strictC: [CSetting] = [
    .enableWarning("all"),
    .enableWarning("extra"),
    .treatAllWarnings(as: .error),
] + (withURing ? [.define("EXACTIO_URING", uringCondition)] : [])

let package = Package(
    name: "ExactIO",
    // Linux is the platform ExactIO is built and tested on (see README "Platforms"). The
    // minimum macOS is the one `Synchronization` (Atomic, Mutex) needs; ExactIO is not yet
    // built or tested there.
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "ExactIO", targets: ["ExactIO"]),
        // ByteView as Foundation's Data (withData: lent, no copy; data: one copy) and
        // ContiguousBytes: a product of its own, so
        // that the core library does not link Foundation.
        .library(name: "ExactIOFoundation", targets: ["ExactIOFoundation"]),
        // A server as a swift-service-lifecycle `Service` (graceful shutdown, loop counters
        // through swift-metrics): a product of its own, so that the core library depends on
        // neither.
        .library(name: "ExactIOServiceLifecycle", targets: ["ExactIOServiceLifecycle"]),
    ],
    traits: [
        .trait(
            name: "IOUring",
            description: "The io_uring reader and loop backends (Linux; needs liburing, Debian liburing-dev). "
                + "Off: readers use read(2) and loops epoll or poll(2), and nothing links liburing."
        ),
        .default(enabledTraits: ["IOUring"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        // Logging: the optional `Options.logger` (trace/debug only). A small package with no
        // dependencies of its own.
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        // Only ExactIOServiceLifecycle uses these two.
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/x-sheep/swift-property-based", from: "2.0.1"),
        // `swift package generate-documentation` (the DocC catalogue, built in CI with
        // --warnings-as-errors); a command plugin: nothing of it is linked.
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
        // Only the bench's command line uses it.
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
    ],
    targets: [
        // liburing through pkg-config; SwiftPM prints the apt hint when it is missing.
        .systemLibrary(
            name: "ExactIOLibURing",
            path: "Sources/ExactIOLibURing",
            pkgConfig: "liburing",
            providers: [.apt(["liburing-dev"])]
        ),
        // The thin C layer: ring, registration, read loop. Its public header is opaque
        // (no liburing types), see CSupport/include/ExactIOCSupport.h.
        .target(
            name: "ExactIOCSupport",
            dependencies: uringTarget("ExactIOLibURing"),
            path: "CSupport",
            cSettings: [.define("_GNU_SOURCE")] + strictC
        ),
        // Linux interfaces the Glibc module lacks (epoll, eventfd, accept4): the loop's epoll backend.
        .target(
            name: "CExactIOLinux",
            cSettings: strictC
        ),
        .target(
            name: "ExactIO",
            dependencies: uringTarget("ExactIOCSupport") + [
                .target(name: "CExactIOLinux", condition: linux),
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "ExactIOFoundation",
            dependencies: ["ExactIO"],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "ExactIOServiceLifecycle",
            dependencies: [
                "ExactIO",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Metrics", package: "swift-metrics"),
            ],
            swiftSettings: swiftSettings
        ),
        // Test-only C helpers (seccomp filter, signal storm): never linked into the library.
        .target(
            name: "ExactIOCTestSupport",
            path: "Tests/ExactIOCTestSupport",
            cSettings: [.define("_GNU_SOURCE")] + strictC
        ),
        .testTarget(
            name: "ExactIOTests",
            dependencies: [
                "ExactIO",
                "ExactIOCTestSupport",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "PropertyBased", package: "swift-property-based"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ExactIOFoundationTests",
            dependencies: [
                "ExactIO",
                "ExactIOFoundation",
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: swiftSettings
        ),
        // What runs where Linux's interfaces are missing (read(2), the loop on poll(2)): POSIX
        // only, so that it builds and runs on macOS as well as here.
        .testTarget(
            name: "ExactIOPortableTests",
            dependencies: [
                "ExactIO",
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ExactIOServiceLifecycleTests",
            dependencies: [
                "ExactIO",
                "ExactIOServiceLifecycle",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "ServiceLifecycleTestKit", package: "swift-service-lifecycle"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ExactIOCSupportTests",
            dependencies: uringTarget("ExactIOCSupport"),
            swiftSettings: swiftSettings
        ),
        // The fuzz target's replay tool (normal builds) / libFuzzer entry (Fuzz/run.sh).
        .executableTarget(
            name: "fuzz-exactio",
            dependencies: [
                "ExactIO",
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            path: "Fuzz/Sources",
            swiftSettings: swiftSettings
        ),
        // Examples/: programs on the public API only, built and run in CI.
        .executableTarget(
            name: "exactio-frame-inspect",
            dependencies: [
                "ExactIO",
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            path: "Examples/FrameInspect",
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "exactio-ingest",
            dependencies: [
                "ExactIO",
                "ExactIOServiceLifecycle",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            path: "Examples/IngestServer",
            swiftSettings: swiftSettings
        ),
        // The bench's C ceiling (c-readahead, c-readahead-uring): the fastest plain C frame reader.
        .target(
            name: "ExactIOBenchCeiling",
            dependencies: uringTarget("ExactIOLibURing"),
            path: "Benchmarks/ceiling",
            cSettings: [.define("_GNU_SOURCE")] + strictC
        ),
        .executableTarget(
            name: "bench",
            dependencies: [
                "ExactIO",
                "ExactIOBenchCeiling",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "Benchmarks/bench",
            swiftSettings: swiftSettings
        ),
    ],
    swiftLanguageModes: [.v6],
    cLanguageStandard: .c11
)

#if !os(Linux)
// Elsewhere (macOS), the package builds its libraries (ExactIOServiceLifecycle too), the
// frame-inspect example and the fuzz replay tool, and tests what ExactIOPortableTests covers.
// The other test targets, their C helpers (seccomp, signal storms), the ingest example and its
// client (Glibc socket spellings), the bench and its C ceilings (epoll, io_uring) are written
// for Linux only.
let linuxOnly: Set = [
    "ExactIOTests", "ExactIOFoundationTests", "ExactIOCSupportTests", "ExactIOServiceLifecycleTests", "ExactIOCTestSupport",
    "ExactIOBenchCeiling", "bench", "exactio-ingest",
]
package.targets.removeAll { linuxOnly.contains($0.name) }
#endif

if !withURing {
    // EXACTIO_NO_URING=1: not even the targets of the io_uring part (with the trait off they
    // are there, compiled empty).
    let needLibURing: Set = ["ExactIOLibURing", "ExactIOCSupport", "ExactIOCSupportTests"]
    package.targets.removeAll { needLibURing.contains($0.name) }
}
