// ByteView: the read-only, zero-copy result of every read, and what it conforms to.

/// An immutable, read-only view of bytes that a reader delivered, in the memory they landed in.
///
/// A `ByteView` is a `RandomAccessCollection` of `UInt8` indexed from `0` to `count`. It keeps
/// its memory alive: the memory is returned (to the reader's pool, or to the system) when the
/// last copy of the view, and of every view sharing that memory, is released. Nothing writes
/// to that memory while a view references it, so a view never changes under its holder and
/// can be sent to any thread.
///
/// Copying a `ByteView` copies a reference, never the bytes. `subview(_:)` makes another
/// zero-based view of part of the same memory, also without copying.
public struct ByteView: @unchecked Sendable {
    // Invariant: `storage` lies inside memory kept alive by `owner` (or is empty with a nil
    // owner), and no code writes to it while `owner` is referenced by a view: the reader
    // retires referenced staging memory instead of overwriting it (StagingBuffer), and the
    // pool reuses memory only after the owner's deinit. That is what makes the
    // `@unchecked Sendable` sound: the bytes are immutable for the view's whole life.
    @usableFromInline let storage: UnsafeRawBufferPointer
    @usableFromInline let owner: AnyObject?

    @inlinable
    init(unsafeBytes bytes: UnsafeRawBufferPointer, owner: AnyObject?) {
        self.storage = bytes
        self.owner = owner
    }

    /// An empty view; allocates nothing.
    @inlinable
    public init() {
        self.storage = UnsafeRawBufferPointer(start: nil, count: 0)
        self.owner = nil
    }

    /// A view holding a copy of `bytes` in memory of its own (one copy), for constants and
    /// comparisons, and to keep a few bytes of a large view without keeping its memory: a
    /// view keeps the whole block it points into alive (see the README, "What a kept view
    /// costs"). Like `Array`, it traps if the system has no memory left for the copy.
    public init(_ bytes: some Sequence<UInt8>) {
        // The copy is made inside the closure: the buffer is lent only while it runs (small
        // strings' `utf8`, substrings and inline `Data` lend a temporary copy on the stack).
        var lentCount = 0
        if let copy = bytes.withContiguousStorageIfAvailable({ lent -> Result<ByteView, Errno> in
            lentCount = lent.count
            return Result { () throws(Errno) in try ByteView(copying: UnsafeRawBufferPointer(lent)) }
        }) {
            do {
                try self = copy.get()
            } catch {
                fatalError("ByteView: no memory for a copy of \(lentCount) bytes")
            }
            return
        }
        let array = Array(bytes)
        do {
            try self = array.withUnsafeBytes { raw throws(Errno) in try ByteView(copying: raw) }
        } catch {
            fatalError("ByteView: no memory for a copy of \(array.count) bytes")
        }
    }

    /// A view holding a copy of `bytes` in heap memory of its own; `Errno.noMemory` when
    /// there is none.
    init(copying bytes: UnsafeRawBufferPointer) throws(Errno) {
        guard let src = bytes.baseAddress, bytes.count > 0 else {
            self.init()
            return
        }
        let region = try Region.standalone(capacity: bytes.count)
        region.base.copyMemory(from: src, byteCount: bytes.count)
        self.init(unsafeBytes: UnsafeRawBufferPointer(start: region.base, count: bytes.count), owner: region)
    }

    /// Calls `body` with a pointer to the bytes in place (no copy).
    ///
    /// - warning: Do not escape the pointer from the closure; it is valid only while the
    ///   closure runs (the view may be the last owner of the memory). Do not write through it.
    @inlinable
    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try withExtendedLifetime(owner) { () throws(E) -> R in try body(storage) }
    }

    /// A zero-based view of `range` of this view, sharing its memory (no copy).
    ///
    /// - Precondition: `range` lies within `0..<count`.
    public func subview(_ range: Range<Int>) -> ByteView {
        precondition(range.lowerBound >= 0 && range.upperBound <= count, "subview range \(range) out of 0..<\(count)")
        if range.isEmpty { return ByteView() }
        return ByteView(unsafeBytes: UnsafeRawBufferPointer(rebasing: storage[range]), owner: owner)
    }

    /// The bytes as a new array (one copy).
    public var array: [UInt8] { withUnsafeBytes { Array($0) } }

    /// True when both views share the same memory block (not just equal contents).
    public func sharesMemory(with other: ByteView) -> Bool {
        guard let a = ByteView.block(of: owner), let b = ByteView.block(of: other.owner) else { return false }
        return a === b
    }

    /// The region behind an owner: views of staging own a chunk of it.
    static func block(of owner: AnyObject?) -> AnyObject? {
        if let chunk = owner as? StagingChunk { return chunk.region }
        return owner
    }
}

extension ByteView: RandomAccessCollection {
    /// A view's elements are bytes.
    public typealias Element = UInt8
    /// Positions are offsets from the view's first byte: `0..<count`.
    public typealias Index = Int
    /// `0..<count`.
    public typealias Indices = Range<Int>
    /// A slice shares the view's memory (no copy); `subview(_:)` gives a range as a `ByteView` that keeps the memory alive on its own.
    public typealias SubSequence = Slice<ByteView>

    /// Always 0: a view's indices start at zero, whatever memory it is in.
    @inlinable public var startIndex: Int { 0 }
    @inlinable public var endIndex: Int { storage.count }
    @inlinable public var count: Int { storage.count }
    @inlinable public var isEmpty: Bool { storage.count == 0 }
    @inlinable public var indices: Range<Int> { 0..<storage.count }

    @inlinable
    public subscript(position: Int) -> UInt8 {
        precondition(position >= 0 && position < storage.count, "ByteView index \(position) out of 0..<\(storage.count)")
        return withExtendedLifetime(owner) { storage[position] }
    }

    @inlinable
    public func index(after i: Int) -> Int { i + 1 }
    @inlinable
    public func index(before i: Int) -> Int { i - 1 }

    @inlinable
    public func withContiguousStorageIfAvailable<R>(_ body: (UnsafeBufferPointer<UInt8>) throws -> R) rethrows -> R? {
        try withExtendedLifetime(owner) {
            try body(storage.assumingMemoryBound(to: UInt8.self))
        }
    }
}

extension ByteView: Equatable {
    /// Views are equal when their bytes are equal, wherever the bytes live.
    public static func == (lhs: ByteView, rhs: ByteView) -> Bool {
        guard lhs.count == rhs.count else { return false }
        if lhs.count == 0 || lhs.storage.baseAddress == rhs.storage.baseAddress { return true }
        return withExtendedLifetime((lhs.owner, rhs.owner)) {
            memcmp(lhs.storage.baseAddress!, rhs.storage.baseAddress!, lhs.count) == 0
        }
    }
}

extension ByteView: Hashable {
    /// Hashes the bytes (consistent with `==`, which compares bytes, not memory).
    public func hash(into hasher: inout Hasher) {
        withUnsafeBytes { hasher.combine(bytes: $0) }
    }
}

extension ByteView: CustomStringConvertible {
    public var description: String {
        let shown = prefix(16).map { byte in
            let hex = String(byte, radix: 16)
            return byte < 16 ? "0" + hex : hex
        }.joined(separator: " ")
        return "ByteView(\(count) bytes\(count > 0 ? ": " + shown : "")\(count > 16 ? " …" : ""))"
    }
}

extension ByteView {
    /// The bytes as a `RawSpan` (SE-0456's name for a contiguous type's borrowed bytes), valid
    /// while this view is borrowed. No copy.
    public var bytes: RawSpan {
        @_lifetime(borrow self)
        get {
            let span = RawSpan(_unsafeBytes: storage)
            return _overrideLifetime(span, borrowing: self)
        }
    }

    /// The bytes as a `Span<UInt8>` (SE-0456), valid while this view is borrowed. No copy.
    public var span: Span<UInt8> {
        @_lifetime(borrow self)
        get {
            let span = Span(_unsafeElements: storage.assumingMemoryBound(to: UInt8.self))
            return _overrideLifetime(span, borrowing: self)
        }
    }

    /// The bytes as a `RawSpan`: the same as `bytes`, its name before SE-0456.
    @available(*, deprecated, renamed: "bytes")
    public var bytesSpan: RawSpan {
        @_lifetime(borrow self)
        get { bytes }
    }

    /// The bytes decoded as UTF-8 (invalid sequences become U+FFFD), with no intermediate
    /// array: one copy, into the string's own storage.
    public var utf8String: String {
        withUnsafeBytes { String(decoding: $0, as: UTF8.self) }
    }
}

import SystemPackage
