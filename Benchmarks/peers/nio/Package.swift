// swift-tools-version: 6.0
// bench peer: SwiftNIO's LengthFieldBasedFrameDecoder. A package of its own, so that NIO never
// enters ExactIO's package graph; `bench --peers` builds it on first use.
import PackageDescription

let package = Package(
    name: "NIOPeer",
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-extras", from: "1.35.2"),
    ],
    targets: [
        .executableTarget(
            name: "NIOPeer",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOExtras", package: "swift-nio-extras"),
            ]
        )
    ]
)
