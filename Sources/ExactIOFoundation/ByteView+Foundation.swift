import ExactIO
import Foundation

// ByteView as Foundation's Data (a copy, or lent without one) and ContiguousBytes.

extension ByteView {
    /// The bytes as a new `Data` of its own: one copy.
    ///
    /// The `Data` owns its bytes: it can be kept, sent and mutated like any other, and it does
    /// not keep the view's memory alive. To hand the bytes to a Foundation API without the copy,
    /// lend them with ``withData(_:)``.
    ///
    /// ```swift
    /// let body = frame.data          // one copy; mutable, the frame is untouched
    /// ```
    public var data: Data {
        withUnsafeBytes { raw in
            guard let base = raw.baseAddress, raw.count > 0 else { return Data() }
            return Data(bytes: base, count: raw.count)
        }
    }

    /// Calls `body` with the bytes as a `Data` over the view's memory, for Foundation-based
    /// APIs (`JSONDecoder`, `PropertyListDecoder`, `FileHandle.write`): no copy for views of 15
    /// bytes and more; Foundation stores 14 bytes or fewer inline, so a view that short is
    /// copied (into the `Data` value itself, no allocation).
    ///
    /// Reading the `Data` reads the view's memory in place. Mutating a copy of it inside
    /// `body` (`var d = data; d[0] = 0`) makes Foundation copy the bytes first, so the view and
    /// every other holder of its memory never see the change: for the whole call, this method
    /// holds a second reference to the `Data`'s storage, and Foundation writes in place only
    /// into storage it holds uniquely.
    ///
    /// - warning: The `Data` must not escape `body` (stored, returned, captured by an escaping
    ///   closure or a task). After the call that second reference is gone, and a mutation of an
    ///   escaped copy could write into the view's memory, which other holders read. Use
    ///   ``data`` (one copy) for a `Data` to keep.
    ///
    /// ```swift
    /// let order = try frame.withData { try JSONDecoder().decode(Order.self, from: $0) }
    /// ```
    public func withData<R>(_ body: (Data) throws -> R) rethrows -> R {
        guard !isEmpty else { return try body(Data()) }
        let keep = self
        return try withUnsafeBytes { raw in
            // Safety: Foundation writes through this pointer only when a mutation finds the
            // storage uniquely referenced; `held` below is a second reference for the whole
            // call, so every mutation inside `body` copies first. The deallocator keeps the
            // view's memory alive for as long as the storage lives (also if the Data escapes
            // against the documented rule: then reading it stays safe). Up to 14 bytes,
            // Foundation copies into inline storage at once and releases this one.
            let data = Data(
                bytesNoCopy: UnsafeMutableRawPointer(mutating: raw.baseAddress!), count: raw.count,
                deallocator: .custom { _, _ in withExtendedLifetime(keep) {} })
            let held = data
            return try withExtendedLifetime(held) { try body(data) }
        }
    }
}

/// `ContiguousBytes`: Foundation's and CryptoKit-style APIs that take any contiguous bytes
/// read a view in place.
extension ByteView: ContiguousBytes {}
