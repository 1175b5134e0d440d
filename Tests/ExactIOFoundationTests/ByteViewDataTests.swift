import ExactIO
import ExactIOFoundation
import Foundation
import SystemPackage
import Testing

@Suite struct ByteViewDataTests {
    /// A frame read from a pipe (a view of the reader's staging memory).
    static func frameView(_ body: [UInt8]) throws -> ByteView {
        let p = try FileDescriptor.pipe()
        defer { try? p.readEnd.close() }
        let n = UInt32(body.count)
        let wire = [UInt8(n >> 24), UInt8(n >> 16 & 0xff), UInt8(n >> 8 & 0xff), UInt8(n & 0xff)] + body
        _ = try wire.withUnsafeBytes { try p.writeEnd.write($0) }
        try p.writeEnd.close()
        let reader = try ExactReader(p.readEnd)
        return try #require(try reader.readFrame())
    }

    @Test func withDataLendsTheViewsMemory() throws {
        let view = try Self.frameView(Array("{\"id\": 7, \"name\": \"x\"}".utf8))
        struct Order: Decodable { var id: Int; var name: String }
        let order = try view.withData { data in
            #expect(data.count == view.count)
            let same = data.withUnsafeBytes { d in view.withUnsafeBytes { v in d.baseAddress == v.baseAddress } }
            #expect(same, "the Data's bytes are the view's memory: no copy")
            return try JSONDecoder().decode(Order.self, from: data)
        }
        #expect(order.id == 7 && order.name == "x")
    }

    @Test func dataIsACopyThatDoesNotHoldTheViewsMemory() throws {
        let body = (0..<5000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        var data: Data? = nil
        weak var owner: AnyObject? = nil
        do {
            let view = try Self.frameView(body)
            owner = Mirror(reflecting: view).children.first { $0.label == "owner" }?.value as AnyObject?
            data = view.data
            let same = data!.withUnsafeBytes { d in view.withUnsafeBytes { v in d.baseAddress == v.baseAddress } }
            #expect(!same, "the Data has bytes of its own")
        }
        #expect(owner == nil, "the view's memory goes with the view and the reader: the Data does not hold it")
        #expect(Array(data!) == body)
    }

    @Test func mutatingTheDataNeverWritesIntoTheView() throws {
        let view = try Self.frameView([1, 2, 3, 4])
        var data = view.data
        data[0] = 99
        #expect(data[0] == 99)
        #expect(Array(view) == [1, 2, 3, 4], "the view's bytes did not change")
    }

    @Test func contiguousBytesReadsInPlace() throws {
        let view = try Self.frameView([9, 8, 7])
        func sum(_ bytes: some ContiguousBytes) -> Int { bytes.withUnsafeBytes { $0.reduce(0) { $0 + Int($1) } } }
        #expect(sum(view) == 24)
        #expect(view.utf8String == String(decoding: [9, 8, 7], as: UTF8.self))
    }
}

/// `ByteView(_:)` from Foundation's `Data` (issue 16, item 2): small `Data` values are stored
/// inline, and lend a temporary copy of their bytes.
@Suite struct ByteViewFromDataTests {
    @Test(arguments: [0, 1, 4, 9, 13, 14, 15, 16, 64, 5000])
    func aViewOfDataHasItsBytes(count: Int) {
        let bytes = (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
        let data = Data(bytes)
        let slice = Data(bytes + [1, 2, 3]).dropFirst(3)
        var wrong = 0
        for _ in 0..<2_000 {
            if ByteView(data).array != bytes { wrong += 1 }
            if ByteView(slice).array != Array(slice) { wrong += 1 }
        }
        #expect(wrong == 0, "wrong bytes in \(wrong) of 4000 views of \(count)-byte Data")
    }
}

/// `ByteView.data` and `withData` never let a caller write into memory other holders of the
/// view read (issue 16, item 3: Foundation writes in place into a uniquely referenced
/// `Data(bytesNoCopy:)` storage, whatever its deallocator; only 14 bytes and fewer are stored
/// inline, which is why a 4-byte test passed).
@Suite struct ByteViewDataMutationTests {
    static let sizes = [15, 16, 64 << 10, 1 << 20]

    /// The backends a reader is made with: POSIX, and whatever `.automatic` chooses here
    /// (io_uring where it is available).
    static let backends: [ExactReader.Backend] = [.posix, .automatic]

    /// Two frames (`body`, then a 15-byte one) read by a reader over a socketpair, fed by a
    /// thread: views of the reader's staging memory or of a frame's own (registered) memory.
    static func readerViews(_ body: [UInt8], backend: ExactReader.Backend) throws -> (ByteView, ByteView) {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else { throw Errno(rawValue: errno) }
        let readEnd = FileDescriptor(rawValue: fds[0])
        let writeEnd = FileDescriptor(rawValue: fds[1])
        defer { try? readEnd.close() }
        func frame(_ b: [UInt8]) -> [UInt8] {
            let n = UInt32(b.count)
            return [UInt8(n >> 24), UInt8(n >> 16 & 0xff), UInt8(n >> 8 & 0xff), UInt8(n & 0xff)] + b
        }
        let wire = frame(body) + frame(Array(repeating: 0x5A, count: 15))
        let written = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            _ = try? writeEnd.writeAll(wire)
            try? writeEnd.close()
            written.signal()
        }
        let reader = try ExactReader(readEnd, options: .init(backend: backend))
        let first = try #require(try reader.readFrame())
        let second = try #require(try reader.readFrame())
        written.wait()
        return (first, second)
    }

    static func body(_ count: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ 7) }
    }

    /// The mutations of a `Data` a caller may make, each on a fresh `Data` from `make` (so that
    /// Foundation sees it uniquely referenced): setting bytes, writing through
    /// `withUnsafeMutableBytes`, `resetBytes`, `replaceSubrange`, `append`. `make` gets the
    /// mutation to run on its `Data` (`.data` returns one; `withData` lends one).
    static var mutations: [(String, (inout Data) -> Void)] { [
        ("subscript set", { d in d[0] ^= 0xFF; d[d.count - 1] ^= 0xFF }),
        ("withUnsafeMutableBytes", { d in _ = d.withUnsafeMutableBytes { $0.initializeMemory(as: UInt8.self, repeating: 0) } }),
        ("resetBytes", { d in d.resetBytes(in: 0..<min(d.count, 100)) }),
        ("replaceSubrange", { d in d.replaceSubrange(0..<1, with: [1, 2, 3]) }),
        ("append", { d in d.append(9) }),
    ] }

    /// Whether `bytes` holds exactly `expected` (memcmp: debug builds compare 1 MiB slowly
    /// element by element).
    static func same(_ bytes: some ContiguousBytes, _ expected: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { a in
            expected.withUnsafeBytes { b in a.count == b.count && (a.count == 0 || memcmp(a.baseAddress!, b.baseAddress!, a.count) == 0) }
        }
    }

    /// Runs every mutation through `apply`, then checks that `view`, a copy of it and
    /// `sibling` (another view of the same reader's memory) still hold their bytes.
    static func check(
        _ view: ByteView, copy: ByteView, sibling: ByteView?, expected: [UInt8], how: String,
        apply: ((inout Data) -> Void) -> Void, sourceLocation: SourceLocation = #_sourceLocation
    ) {
        for (name, mutation) in mutations {
            apply(mutation)
            let viewSame = same(view, expected)
            let copySame = same(copy, expected)
            #expect(viewSame, "\(how), \(name): the view's bytes changed (\(view.count) bytes)", sourceLocation: sourceLocation)
            #expect(copySame, "\(how), \(name): another copy of the view changed", sourceLocation: sourceLocation)
            if let sibling {
                #expect(same(sibling, Array(repeating: 0x5A, count: 15)), "\(how), \(name): a view of the same reader's memory changed",
                        sourceLocation: sourceLocation)
            }
        }
    }

    @Test(arguments: backends, sizes)
    func mutatingDataOfAReadersViewLeavesTheViewAlone(backend: ExactReader.Backend, size: Int) throws {
        let expected = Self.body(size)
        let (view, sibling) = try Self.readerViews(expected, backend: backend)
        let copy = view
        Self.check(view, copy: copy, sibling: sibling, expected: expected, how: ".data") { mutation in
            var d = view.data
            mutation(&d)
        }
        var d = view.data
        d[0] = expected[0] ^ 0xFF
        #expect(d[0] == expected[0] ^ 0xFF && view[0] == expected[0] && copy[0] == expected[0])
    }

    @Test(arguments: sizes)
    func mutatingDataOfAnArraysViewLeavesTheViewAlone(size: Int) throws {
        let expected = Self.body(size)
        let view = ByteView(expected)
        let copy = view
        Self.check(view, copy: copy, sibling: nil, expected: expected, how: ".data") { mutation in
            var d = view.data
            mutation(&d)
        }
        var d = view.data
        d[0] = expected[0] ^ 0xFF
        #expect(d[0] == expected[0] ^ 0xFF && view[0] == expected[0] && copy[0] == expected[0])
    }

    /// Runs every mutation on a copy of the `Data` `withData` lends, each in a call of its own;
    /// the lent `Data` is the view's memory, and it does not change either.
    static func checkWithData(_ view: ByteView, copy: ByteView, sibling: ByteView?, expected: [UInt8],
                              sourceLocation: SourceLocation = #_sourceLocation) {
        Self.check(view, copy: copy, sibling: sibling, expected: expected, how: "withData", apply: { mutation in
            view.withData { lent in
                let inPlace = lent.withUnsafeBytes { d in view.withUnsafeBytes { v in d.baseAddress == v.baseAddress } }
                #expect(inPlace || view.count <= 14, "no copy (Foundation keeps 14 bytes and fewer inline)",
                        sourceLocation: sourceLocation)
                var d = lent
                mutation(&d)
                #expect(same(lent, expected), "the lent Data did not change", sourceLocation: sourceLocation)
            }
        }, sourceLocation: sourceLocation)
        view.withData { lent in
            var d = lent
            d[0] = expected[0] ^ 0xFF
            #expect(d[0] == expected[0] ^ 0xFF && lent[0] == expected[0] && view[0] == expected[0] && copy[0] == expected[0],
                    sourceLocation: sourceLocation)
        }
    }

    @Test(arguments: backends, sizes)
    func mutatingDataLentByWithDataLeavesAReadersViewAlone(backend: ExactReader.Backend, size: Int) throws {
        let expected = Self.body(size)
        let (view, sibling) = try Self.readerViews(expected, backend: backend)
        Self.checkWithData(view, copy: view, sibling: sibling, expected: expected)
    }

    @Test(arguments: sizes)
    func mutatingDataLentByWithDataLeavesAnArraysViewAlone(size: Int) throws {
        let expected = Self.body(size)
        let view = ByteView(expected)
        Self.checkWithData(view, copy: view, sibling: nil, expected: expected)
    }

    @Test func withDataOfAnEmptyViewAndItsResult() throws {
        #expect(ByteView().withData { $0.isEmpty })
        #expect(ByteView().data.isEmpty)
        struct Failure: Error {}
        #expect(throws: Failure.self) { try ByteView([1, 2, 3]).withData { _ in throw Failure() } }
        #expect(ByteView(Self.body(100)).withData { $0.count } == 100)
    }
}
