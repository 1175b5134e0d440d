import Testing
@testable import ExactIO

@Suite struct ByteViewTests {
    @Test func emptyViewAllocatesNothing() {
        let v = ByteView()
        #expect(v.isEmpty)
        #expect(v.count == 0)
        #expect(v.owner == nil)
        #expect(Array(v) == [])
        #expect(v == ByteView([]))
    }

    @Test func collectionSemantics() {
        let bytes: [UInt8] = [1, 2, 3, 250, 0, 7]
        let v = ByteView(bytes)
        #expect(v.count == 6)
        #expect(v.startIndex == 0 && v.endIndex == 6)
        #expect(v[0] == 1 && v[3] == 250)
        #expect(v == ByteView(bytes))
        #expect(Array(v.reversed()) == bytes.reversed())
        #expect(v.first == 1 && v.last == 7)
        #expect(Array(v[1..<3]) == [2, 3])
        #expect(v.contains(250))
        #expect(v.withContiguousStorageIfAvailable { Array($0) } == bytes)
        #expect(v.withUnsafeBytes { Array($0) } == bytes)
        #expect(v.array == bytes)
        #expect(v.bytes.byteCount == 6)
        #expect(v.span.count == 6 && v.span[0] == v[0] && v.span[5] == v[5])
    }

    @Test func subviewIsZeroBasedAndSharesMemory() {
        let v = ByteView(pattern(100))
        let s = v.subview(10..<20)
        #expect(s.count == 10)
        #expect(s[0] == v[10])
        #expect(Array(s) == Array(v[10..<20]))
        #expect(s.sharesMemory(with: v))
        #expect(v.subview(5..<5).isEmpty)
    }

    @Test func equalityIsByContent() {
        let a = ByteView([1, 2, 3])
        let b = ByteView([1, 2, 3])
        #expect(a == b)
        #expect(!a.sharesMemory(with: b))
        #expect(a != ByteView([1, 2, 4]))
        #expect(a != ByteView([1, 2]))
        #expect(Set([a, b]).count == 1)
    }

    @Test func memoryIsReleasedWithTheLastCopy() {
        weak var owner: AnyObject?
        do {
            let v = ByteView(pattern(4096))
            owner = v.owner
            var copies = [v, v, v.subview(1..<10)]
            #expect(owner != nil)
            copies.removeAll()
            #expect(owner != nil, "the original still holds it")
            _ = v.count
        }
        #expect(owner == nil, "released with its last copy")
    }

    @Test func viewIsSendable() async {
        let v = ByteView(pattern(1000))
        let sum = await Task.detached { v.reduce(0) { $0 &+ Int($1) } }.value
        #expect(sum == pattern(1000).reduce(0) { $0 &+ Int($1) })
    }
}
