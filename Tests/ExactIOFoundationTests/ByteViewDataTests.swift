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

    @Test func dataSharesTheViewsMemory() throws {
        let view = try Self.frameView(Array("{\"id\": 7, \"name\": \"x\"}".utf8))
        let data = view.data
        #expect(data.count == view.count)
        let same = data.withUnsafeBytes { d in view.withUnsafeBytes { v in d.baseAddress == v.baseAddress } }
        #expect(same, "the Data's bytes are the view's memory: no copy")
        struct Order: Decodable { var id: Int; var name: String }
        let order = try JSONDecoder().decode(Order.self, from: data)
        #expect(order.id == 7 && order.name == "x")
    }

    @Test func theDataKeepsTheMemoryAliveAfterTheViewIsGone() throws {
        let body = (0..<5000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        var data: Data? = nil
        weak var owner: AnyObject? = nil
        do {
            let view = try Self.frameView(body)
            owner = Mirror(reflecting: view).children.first { $0.label == "owner" }?.value as AnyObject?
            data = view.data
        }
        #expect(owner != nil, "the Data holds the view's memory after the view and the reader are gone")
        #expect(Array(data!) == body)
        data = nil
        #expect(owner == nil, "the memory goes when the Data goes")
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
