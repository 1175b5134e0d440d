// Which `ExactReader.Options` fields an AsyncExactReader honours, and the refusal of those it
// could only ignore.

extension ExactReader.Options {
    /// Throws `InvalidOptionError` for a field an `AsyncExactReader` on `loop` could only
    /// ignore, so that no option is silently dropped:
    ///
    /// - `backend`: the reader reads through its loop; `.automatic`, or the loop's own backend,
    ///   is accepted (the latter as an assertion), another backend is refused.
    /// - `directIO`: must be false (O_DIRECT is for regular files, which an async reader does
    ///   not read).
    /// - `queueDepth`: must be its default, 4 (it shapes reads of regular files only).
    ///
    /// `registeredMemoryLimit` is honoured as it stands: a loop's readers register no memory
    /// (their large bodies go to the loop's unregistered frame memory), so every limit holds.
    func validate(forReaderOn loop: IOLoop) throws(ExactReader.InvalidOptionError) {
        if backend != .automatic && backend != loop.backend {
            throw .init(
                option: "backend", value: "\(backend)",
                requirement: "automatic or the loop's backend (\(loop.backend)): an AsyncExactReader reads through its IOLoop")
        }
        if directIO {
            throw .init(
                option: "directIO", value: "true",
                requirement: "false: an AsyncExactReader reads no regular files (read them with ExactReader)")
        }
        if queueDepth != 4 {  // the initializer's default
            throw .init(
                option: "queueDepth", value: "\(queueDepth)",
                requirement: "4, the default: it applies to regular files, which an AsyncExactReader does not read")
        }
    }
}
