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

/// `ByteView(_:)` copies its argument's bytes while they are lent to it: small strings' UTF-8
/// views, substrings and other sequences lend a temporary copy (issue 16, item 2: the pointer
/// used to escape `withContiguousStorageIfAvailable`, and the copy was taken from a dead stack
/// buffer — wrong bytes for "PING".utf8 and for 9–15-byte strings).
@Suite struct ByteViewFromSequenceTests {
    static let repeats = 2_000

    /// Checks `ByteView(make())` against `Array(make())`, `repeats` times (a dead stack copy
    /// is overwritten by the calls in between, so one lucky run proves nothing).
    static func check<S: Sequence<UInt8>>(_ what: String, _ make: () -> S, sourceLocation: SourceLocation = #_sourceLocation) {
        let expected = Array(make())
        var wrong = 0
        var sample = ""
        for _ in 0..<repeats {
            let v = ByteView(make())
            if v.array != expected {
                if wrong == 0 { sample = "\(v.array) instead of \(expected)" }
                wrong += 1
            }
        }
        #expect(wrong == 0, "\(what): wrong bytes in \(wrong) of \(repeats) views, e.g. \(sample)", sourceLocation: sourceLocation)
    }

    @Test func aStringLiteralsUTF8() {
        Self.check("\"PING\".utf8") { "PING".utf8 }
        #expect(ByteView("PING".utf8) == ByteView([0x50, 0x49, 0x4E, 0x47]))
    }

    @Test func stringsOfEveryLengthUpTo40() {
        for n in 0...40 {
            // Built at run time (not literals): small strings (up to 15 UTF-8 bytes) are stored
            // inline, and their `utf8` lends a temporary copy.
            let ascii = String((0..<n).map { Character(UnicodeScalar(UInt8(0x41 + $0 % 26))) })
            Self.check("String of \(n) bytes") { ascii.utf8 }
            Self.check("String of \(n) bytes (utf8CString)") { ascii.utf8CString.map { UInt8(bitPattern: $0) } }
            // Multi-byte scalars: n bytes of UTF-8 in 2-byte characters (plus one 'x' when odd).
            let wide = String(repeating: "é", count: n / 2) + (n % 2 == 1 ? "x" : "")
            Self.check("non-ASCII String of \(n) bytes") { wide.utf8 }
        }
    }

    @Test func substrings() {
        let s = "a substring of a longer string, 0123456789"
        for start in [0, 1, 5, 9] {
            for length in [0, 1, 4, 9, 12, 15, 16, 30] where start + length <= s.utf8.count {
                let lo = s.index(s.startIndex, offsetBy: start)
                let hi = s.index(lo, offsetBy: length)
                let sub = s[lo..<hi]
                Self.check("Substring \(start)..<\(start + length)") { sub.utf8 }
            }
        }
        let small = "PING PONG"
        Self.check("Substring of a small string") { small.dropFirst(2).utf8 }
    }

    @Test func arraysSlicesRangesAndOtherSequences() {
        for n in [0, 1, 4, 9, 15, 16, 100, 5000] {
            let a = pattern(n, seed: UInt64(n))
            Self.check("[UInt8] of \(n)") { a }
            Self.check("ArraySlice of \(n)") { a.dropFirst(min(n, 3)) }
            Self.check("ContiguousArray of \(n)") { ContiguousArray(a) }
            Self.check("lazy map of \(n)") { a.lazy.map { $0 &+ 1 } }
        }
        Self.check("0..<200") { (0..<200).lazy.map { UInt8($0) } }
        Self.check("UInt8 range") { UInt8(3)...UInt8(250) }
        Self.check("Unsafe buffer") { UnsafeBufferPointer<UInt8>(start: nil, count: 0) }
        Self.check("repeatElement") { repeatElement(UInt8(7), count: 13) }
    }
}
