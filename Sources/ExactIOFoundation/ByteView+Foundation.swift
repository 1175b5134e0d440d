import ExactIO
import Foundation

extension ByteView {
    /// The bytes as `Data` without a copy: the `Data`'s bytes are this view's memory, which the
    /// `Data` keeps alive (it holds a copy of the view) until it and every copy of it are gone.
    ///
    /// For code that hands frames to Foundation-based APIs (`JSONDecoder`, `PropertyListDecoder`,
    /// `FileHandle.write`). Reading the `Data` reads the view's memory in place. Mutating a copy
    /// of it makes Foundation copy the bytes first (`Data` is copy-on-write over memory it does
    /// not own), so the view's bytes never change.
    ///
    /// ```swift
    /// let order = try JSONDecoder().decode(Order.self, from: frame.data)
    /// ```
    public var data: Data {
        guard !isEmpty else { return Data() }
        let keep = self
        return withUnsafeBytes { raw in
            // Safety: Data(bytesNoCopy:) only reads through the pointer unless it owns the
            // storage uniquely with no deallocator of its own; a .custom deallocator makes any
            // mutation copy first (tested: ByteViewDataTests).
            Data(
                bytesNoCopy: UnsafeMutableRawPointer(mutating: raw.baseAddress!), count: raw.count,
                deallocator: .custom { _, _ in withExtendedLifetime(keep) {} })
        }
    }
}

/// `ContiguousBytes`: Foundation's and CryptoKit-style APIs that take any contiguous bytes
/// read a view in place.
extension ByteView: ContiguousBytes {}
