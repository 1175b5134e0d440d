import Logging
import SystemPackage

// The loop's decisions, written once for every kernel backend: the table of connections and
// listeners, what each command from a reader or an accept sequence does, what each completion
// does next (deliver, re-arm, stop for backpressure, start or continue a large read, starve
// and resume, back off), timers, shutdown and failure. It does no I/O itself: it asks its
// backend (`LoopBackend`) to, and hears back through completions, so that the fuzz harness
// can run it with a scripted backend that picks the completion order.

/// What the loop's thread runs (`IOLoop` holds it without knowing its backend's type).
protocol LoopDriving: AnyObject {
    var kind: ExactReader.Backend { get }
    func handle(_ command: LoopCommand)
    /// Receive buffers whose last user let go.
    func giveBack(_ bids: [UInt16])
    /// Submits what is queued, waits (when `block`) for something to happen or the nearest
    /// timer, and handles what happened.
    func turn(block: Bool)
    /// Counts what the machine holds (timers) into the loop's internal counters.
    func countHeld()
    func beginShutdown()
    /// True once every request is done (after `beginShutdown`).
    var isDrained: Bool { get }
    /// Forgets every connection and listener, then releases the ring or epoll set.
    func finishShutdown()
}

final class LoopMachine<Backend: LoopBackend>: LoopDriving {
    let backend: Backend
    let pool: ReceivePool
    /// Memory for connections that receive into their own (busy ones).
    let framePool: MemoryPool
    let waker: Waker
    /// Counts what the machine and its backend do (the loop publishes them once per turn).
    let count: ((inout IOLoop.Counts) -> Void) -> Void
    /// The clock (CLOCK_MONOTONIC ns); the fuzz harness plays it.
    let now: () -> Int64

    private var entries: [LoopEntry?] = []
    private var generations: [UInt32] = []
    private var freeSlots: [Int] = []
    var timers = TimerHeap<LoopTimer>()
    /// Connections waiting for receive buffers.
    private var starved: [LoopConnection] = []
    private var completions: [LoopCompletion] = []
    private(set) var stopping = false
    /// Connections whose writer's zero-copy views wait for their notification
    /// (LoopMachine+Send.swift); they may have left the table.
    var holdingSenders: [ObjectIdentifier: LoopConnection] = [:]
    /// The kernel interface failed for good (`failForGood`): commands are answered with it.
    private(set) var failure: Errno? = nil
    /// `IOLoop.Options.logger`: accept pauses and failures, the kernel interface failing.
    var logger: Logger? = nil

    /// Accepting pauses for 10 ms after a shortage, doubling up to a second while it lasts.
    static var acceptBackoff: (first: Int64, last: Int64) { (10_000_000, 1_000_000_000) }
    /// Accepts in flight per listener at most: accepted descriptors waiting for the consumer
    /// plus accepts in flight never pass the queue's bound.
    static var acceptsInFlight: Int { 16 }

    init(backend: Backend, pool: ReceivePool, framePool: MemoryPool, waker: Waker,
         now: @escaping () -> Int64 = monotonicNanoseconds, count: @escaping ((inout IOLoop.Counts) -> Void) -> Void) {
        self.backend = backend
        self.pool = pool
        self.framePool = framePool
        self.waker = waker
        self.now = now
        self.count = count
    }

    var kind: ExactReader.Backend { backend.kind }

    // MARK: - The table

    func attach(_ c: LoopConnection) {
        guard !c.token.isAttached else { return }
        c.token = takeSlot(.connection(c))
    }

    private func attach(_ l: Listener) {
        l.token = takeSlot(.listener(l))
    }

    private func takeSlot(_ entry: LoopEntry) -> LoopToken {
        let slot: Int
        if let s = freeSlots.popLast() {
            slot = s
        } else {
            entries.append(nil)
            generations.append(1)
            slot = entries.count - 1
        }
        entries[slot] = entry
        return LoopToken(slot: slot, generation: generations[slot])
    }

    /// Frees a slot; its generation moves on, so completions still tagged with the old one are
    /// recognised as stale.
    private func free(_ token: LoopToken) {
        entries[token.slot] = nil
        generations[token.slot] &+= 1
        freeSlots.append(token.slot)
    }

    /// The entry `token` names, if it is still that incarnation.
    func entry(_ token: LoopToken) -> LoopEntry? {
        guard token.slot >= 0, token.slot < entries.count, generations[token.slot] == token.generation else { return nil }
        return entries[token.slot]
    }

    /// Takes `l` out of the table if it is still there (by identity: a second release cannot
    /// free a slot that belongs to someone else by then), and closes its descriptor.
    private func release(_ l: Listener) {
        guard case .listener(let held)? = entry(l.token), held === l else { return }
        free(l.token)
        l.token = LoopToken()
        l.fd.close()
    }

    /// Frees a detached connection's slot once nothing of it is in the kernel (and its writer,
    /// if it has one, is gone too), and closes the loop's descriptor for it.
    func releaseIfIdle(_ c: LoopConnection) {
        guard c.detached, c.isIdleInKernel, c.senderDone, case .connection(let held)? = entry(c.token), held === c else { return }
        free(c.token)
        c.token = LoopToken()
        c.fd.close()
        c.sender?.released()
    }

    // MARK: - Commands

    func handle(_ command: LoopCommand) {
        if let failure {
            answerFailed(command, failure)
            return
        }
        switch command {
        case .receive(let c):
            guard !c.detached else { return }
            attach(c)
            if stopping {
                c.interrupt(shutDown: true)
                return
            }
            switch c.receive {
            case .idle: startReceive(c)
            case .disarming: c.rearmAfterDisarm = true  // the reader took its bytes meanwhile: go on after
            case .armed, .starved: break
            }
        case .largeRead(let c):
            guard !c.detached else { return }
            attach(c)
            if stopping {
                c.largeReadProgress(0, finished: true, error: .canceled)
                return
            }
            switch c.receive {
            case .armed:
                // The armed receive would race the read for the stream's next bytes: end it
                // first; the read starts when it has ended.
                c.largeRead = .waitingForReceive
                disarm(c)
            case .disarming:
                c.largeRead = .waitingForReceive
            case .starved:
                unstarve(c)
                startLargeRead(c)
            case .idle:
                startLargeRead(c)
            }
        case .cancelLargeRead(let c):
            cancelLargeRead(c)
        case .detach(let c):
            c.detached = true
            if c.receive == .armed { disarm(c) }
            if c.receive == .starved { unstarve(c) }
            cancelLargeRead(c)
            if c.largeRead == .waitingForReceive { c.largeRead = .idle }
            backend.forget(c)
            if c.token.isAttached {
                releaseIfIdle(c)
            } else if c.senderDone {
                c.fd.close()  // never attached: nothing of it is in the kernel
                c.sender?.released()
            }
        case .deadline(let c):
            watch(c)
        case .listen(let l):
            attach(l)
            if stopping {
                l.queue.finish()
                release(l)
            } else {
                accept(l)
            }
        case .unlisten(let l):
            guard l.token.isAttached else { return }  // it ended by itself already
            stopAccepting(l)
        case .resumeAccept(let l):
            guard l.token.isAttached, !l.closing, !stopping else { return }
            l.paused = false
            if l.retryAt == 0 { accept(l) }
        case .inspect(let reply):
            reply(describe())
        case .injectFailures(let count, let errno):
            backend.injectWaitFailures(count: count, errno: errno)
        case .send(let c):
            startSend(c)
        case .cancelSend(let c):
            cancelSend(c)
        case .sendDeadline(let c):
            watchSend(c)
        case .detachSender(let c):
            detachSender(c)
        case .closeConnection(let c, let k):
            closeConnection(c, k)
        case .holdNotifications(let hold):
            backend.holdNotifications(hold)
        case .refuseZeroCopy:
            backend.refuseZeroCopy()
        case .shutdown:
            break  // the loop's thread handles it
        }
    }

    // MARK: - Receiving

    private func startReceive(_ c: LoopConnection) {
        // At most the backpressure bound, and what the reader wants ahead: after a large frame
        // only its next prefix, not the next body (which goes to its own memory).
        let (held, wanted, straddle) = c.state.withLock { s in
            defer { s.framesStraddle = false }
            return (s.held, s.wanted, s.framesStraddle)
        }
        if straddle && c.busy { _ = useOwnMemory(c) }
        let limit = max(min(c.maxBuffered - held, wanted), 4096)
        let target = c.own != nil ? ownTarget(c, limit: limit) ?? .shared(limit: limit) : .shared(limit: limit)
        if let e = backend.armReceive(c, target) {
            c.finishReceiving(eof: false, error: e)
            return
        }
        c.receive = .armed
        c.state.withLock { $0.receiving = true }
    }

    // MARK: - Adaptive receive

    /// Sizes of receives into a connection's own memory: 32 KiB first, doubled after one that
    /// came back full, halved after one that brought less than a quarter; below the least, the
    /// connection is quiet and goes back to the shared buffers.
    static var ownReceiveSizes: (least: Int, first: Int, most: Int) { (16 << 10, 32 << 10, 64 << 10) }
    /// The size of a connection's receive region: four receives of the largest size.
    static var ownRegionSize: Int { 4 * ownReceiveSizes.most }

    /// A connection receives into memory of its own when it is busy (a shared-buffer receive
    /// brought half a buffer at once: more was waiting) and its frames straddle the shared
    /// buffers (its reader copied at least `straddleCopies` bytes of such frames since it last
    /// looked): its frames then lie in one piece, views in place. Small frames that rarely
    /// straddle stay in the shared buffers, which cost no page of a connection's own.
    private var busyReceive: Int { pool.size / 2 }

    /// Memory of the connection's own for its receives, or nil when none can be had.
    private func ownRegion() -> Region? {
        guard let block = try? framePool.take(atLeast: Self.ownRegionSize) else { return nil }
        return Region(block: block, pool: framePool)
    }

    /// Starts receiving into memory of the connection's own (busy, or the shared buffers ran
    /// dry). False when no memory could be had.
    private func useOwnMemory(_ c: LoopConnection) -> Bool {
        if c.own != nil { return true }
        guard let region = ownRegion() else { return false }
        c.own = LoopConnection.OwnReceive(region: region, size: Self.ownReceiveSizes.first)
        return true
    }

    /// The next receive into the connection's own memory: right after the last one, or from
    /// the region's start again when nothing references it any more (its pages are warm), or in
    /// a fresh region when this one has no room. Nil (and back to the shared buffers) when no
    /// memory could be had.
    private func ownTarget(_ c: LoopConnection, limit: Int) -> ReceiveTarget? {
        let want = min(c.own!.size, limit)
        if isKnownUniquelyReferenced(&c.own!.region) {
            c.own!.fill = 0
        } else if c.own!.region.capacity - c.own!.fill < want {
            // No room: the spare region if nothing references it any more, else a fresh one;
            // this one becomes the spare while its last bytes are read.
            let next: Region
            if c.own!.spare != nil && isKnownUniquelyReferenced(&c.own!.spare!) {
                next = c.own!.spare!
            } else if let fresh = ownRegion() {
                next = fresh
            } else {
                c.own = nil
                return nil
            }
            c.own!.spare = c.own!.region
            c.own!.region = next
            c.own!.fill = 0
        }
        let count = min(want, c.own!.region.capacity - c.own!.fill)
        c.own!.asked = count
        return .own(c.own!.region, offset: c.own!.fill, count: count)
    }

    /// After a receive into the connection's own memory brought `n` bytes: the next one asks
    /// for more, less, or the connection goes back to the shared buffers.
    private func adapt(_ c: LoopConnection, received n: Int) {
        guard var own = c.own else { return }
        let sizes = Self.ownReceiveSizes
        if n >= own.asked {
            own.size = min(2 * own.size, sizes.most)
        } else if n < own.asked / 4 {
            own.size /= 2
            if own.size < sizes.least {
                c.own = nil  // quiet: the shared buffers again (the region goes with its bytes)
                return
            }
        }
        own.fill += n
        c.own = own
    }

    private func disarm(_ c: LoopConnection) {
        guard c.receive == .armed else { return }
        c.receive = .disarming
        backend.disarmReceive(c)
    }

    private func received(_ c: LoopConnection, _ bytes: ReceivedBytes?, _ end: ReceiveEnd) {
        let wasDisarming = c.receive == .disarming
        if end != .more { c.receive = .idle }
        if let bytes {
            switch bytes {
            case .own(let region, _, let n) where c.own?.region === region: adapt(c, received: n)
            case .shared(let s): c.busy = s.count >= busyReceive
            default: break
            }
        }
        if let segment = bytes.map(segment) {
            if c.detached {
                if end != .more { receiveEnded(c) }
                return
            }
            let (held, enough) = c.enqueue(segment)
            // Stop at the backpressure bound, or once the reader has what it wants ahead unless
            // the kernel ends the receive there by itself (its byte limit).
            let full = held || (enough && !backend.limitsReceives)
            if end == .more {
                if full { disarm(c) }
                return
            }
            // The receive ended with these bytes (a single-shot receive, a byte limit, a
            // receive into memory of its own): go on unless the reader has enough (it asks
            // again when it wants more: after a large frame's prefix, its body goes to its own
            // memory, not through receives).
            if wasDisarming || held || enough || c.largeRead == .waitingForReceive || stopping {
                c.receivingStopped()
                receiveEnded(c)
            } else {
                startReceive(c)
            }
            return
        }
        switch end {
        case .more:
            return
        case .done, .canceled:
            c.receivingStopped()
        case .endOfStream:
            c.finishReceiving(eof: true, error: nil)
        case .failed(let e):
            if wasDisarming && e == .interrupted {
                c.receivingStopped()
            } else {
                c.finishReceiving(eof: false, error: e)
            }
        case .noBuffers:
            count { $0.statistics.starvations += 1 }
            if !pool.starved.exchange(true, ordering: .acquiringAndReleasing) {
                // Received bytes queued for readers that are not reading leave the shared buffers.
                for case .connection(let other)? in entries { other.evacuate() }
            }
            if c.detached || stopping || wasDisarming || c.largeRead == .waitingForReceive {
                c.receivingStopped()  // what comes next needs no receive buffer
            } else {
                starve(c)
                return
            }
        }
        // Last: it may arm again (a reader that asked meanwhile), which marks it receiving.
        receiveEnded(c)
    }

    /// After a receive ended: a large read that waited for it starts, a reader that asked
    /// meanwhile receives again, a detached connection leaves.
    private func receiveEnded(_ c: LoopConnection) {
        let rearm = c.rearmAfterDisarm
        c.rearmAfterDisarm = false
        if c.largeRead == .waitingForReceive && !c.detached {
            startLargeRead(c)
        } else if rearm && !c.detached && !stopping {
            startReceive(c)
        }
        releaseIfIdle(c)
    }

    /// The bytes of a completion as a segment. A short receive into memory of its own (the
    /// pool was dry) moves into memory of its exact size (one copy of at most half a buffer, on
    /// this path only): kept as it is, every such receive would hold a whole buffer's memory
    /// for a few bytes, and a peer sending a byte at a time would make the loop commit a page
    /// per byte received while the pool is dry.
    private func segment(_ bytes: ReceivedBytes) -> Segment {
        switch bytes {
        case .shared(let segment):
            return segment
        case .own(let region, let start, let n):
            return Segment(owner: region, base: region.base, start: start, end: start + n)
        }
    }

    /// The receive buffers ran out while `c` receives. Receives into memory of its own keep
    /// the connection going: waiting for buffers could wait forever when views the application
    /// keeps hold them all. When not even that can be had, the connection waits for buffers
    /// (no busy loop); `receiving` stays set meanwhile: the loop owes it a receive and arms it
    /// when buffers come back, so the reader does not ask for one in vain.
    private func starve(_ c: LoopConnection) {
        if useOwnMemory(c) {
            startReceive(c)
            if c.receive == .armed { return }
        }
        c.receive = .starved
        starved.append(c)
    }

    private func unstarve(_ c: LoopConnection) {
        c.receive = .idle
        starved.removeAll { $0 === c }
        c.receivingStopped()
    }

    func giveBack(_ bids: [UInt16]) {
        guard !bids.isEmpty else { return }
        backend.giveBack(bids)
        // Connections that starved for buffers receive again.
        pool.starved.store(false, ordering: .releasing)
        guard !starved.isEmpty else { return }
        let waiting = starved
        starved.removeAll()
        for c in waiting where c.receive == .starved {
            c.receive = .idle
            if c.detached { continue }
            startReceive(c)
        }
    }

    // MARK: - Large reads (a body straight into its own memory)

    private func startLargeRead(_ c: LoopConnection) {
        c.largeRead = .idle
        // Anything the receive met first (bytes, an error such as a reset, the end) comes
        // before the read: the reader is sent back to take it. A reset met by the receive and
        // then a read that sees only the end would turn the reset into a clean end.
        guard let r = c.state.withLock({ s -> LargeReadRequest? in s.hasNews ? nil : s.largeRead }) else {
            c.largeReadProgress(0, finished: true, error: nil, retry: true)
            return
        }
        readMore(c, r)
    }

    private func readMore(_ c: LoopConnection, _ r: LargeReadRequest) {
        let dst = UnsafeMutableRawBufferPointer(
            start: r.dst.baseAddress! + r.got, count: min(r.dst.count - r.got, 1 << 30))
        if let e = backend.read(c, into: dst, slot: r.slot) {
            c.largeReadProgress(0, finished: true, error: e)
            return
        }
        c.largeRead = .inFlight
    }

    private func cancelLargeRead(_ c: LoopConnection) {
        guard c.largeRead == .inFlight else { return }
        c.largeRead = .canceling
        backend.cancelRead(c)
    }

    private func readCompleted(_ c: LoopConnection, count n: Int, error: Errno?) {
        let canceling = c.largeRead == .canceling
        c.largeRead = .idle
        defer { releaseIfIdle(c) }
        guard let r = c.state.withLock({ $0.largeRead }) else { return }
        if n > 0 {
            if r.got + n >= r.minimum || canceling || c.detached || stopping {
                c.largeReadProgress(n, finished: true, error: nil)
            } else {
                c.largeReadProgress(n, finished: false, error: nil)
                var next = r
                next.got += n
                readMore(c, next)
            }
        } else {
            c.largeReadProgress(0, finished: true, error: error)  // 0 and nil: the end
        }
    }

    // MARK: - Accepting

    /// Arms accepts on `l` up to the room its queue has (at most `acceptsInFlight`); with no
    /// room and none in flight, accepting pauses until the consumer takes some.
    private func accept(_ l: Listener) {
        var wanted = min(Self.acceptsInFlight, l.queue.room) - l.inFlight
        if wanted <= 0 && l.inFlight == 0 {
            if l.queue.pauseIfFull() {
                l.paused = true
                return
            }
            wanted = 1  // the consumer took some meanwhile
        }
        guard wanted > 0 else { return }
        let (armed, error) = backend.accept(l, count: wanted)
        l.inFlight += armed
        if let error, l.inFlight == 0 {
            logger?.debug("ExactIO listener failed", metadata: ["exactio.listener_fd": "\(l.fd.rawValue)", "exactio.error": "\(error)"])
            l.queue.finish(throwing: error)
            release(l)
        }
    }

    private func stopAccepting(_ l: Listener) {
        l.closing = true
        if l.inFlight > 0 {
            backend.cancelAccepts(l)  // the queue ends when the last completes
        } else {
            l.queue.finish()
            release(l)
        }
    }

    private func accepted(_ l: Listener, _ result: Result<Int32, Errno>) {
        l.inFlight -= 1
        switch result {
        case .success(let fd):
            if l.closing || stopping {
                _ = posixClose(fd)
            } else {
                l.backoff = 0
                if l.queue.yield(FileDescriptor(rawValue: fd)) { l.paused = true }
            }
        case .failure(let e):
            guard !l.closing && !stopping else { break }
            switch e {
            case .connectionAbort, .interrupted, .canceled:
                break
            case .tooManyOpenFiles, .tooManyOpenFilesInSystem, .noBufferSpace, .noMemory:
                // A shortage: nothing is re-armed until a pause is over.
                if l.retryAt == 0 { retryAcceptLater(l, after: e) }
            default:
                logger?.debug("ExactIO listener failed", metadata: ["exactio.listener_fd": "\(l.fd.rawValue)", "exactio.error": "\(e)"])
                l.queue.finish(throwing: e)
                stopAccepting(l)
            }
        }
        if l.closing || stopping {
            if l.inFlight == 0 {
                l.queue.finish()
                release(l)
            }
        } else if !l.paused && l.retryAt == 0 {
            accept(l)
        }
    }

    /// Accepting on `l` stopped for a shortage: it starts again after a pause that doubles
    /// while the shortage lasts (no busy loop at the descriptor limit).
    private func retryAcceptLater(_ l: Listener, after error: Errno) {
        l.backoff = l.backoff == 0 ? Self.acceptBackoff.first : min(2 * l.backoff, Self.acceptBackoff.last)
        l.retryAt = now() + l.backoff
        timers.insert(l.retryAt, .acceptRetry(l))
        logger?.debug(
            "ExactIO accepting paused",
            metadata: ["exactio.listener_fd": "\(l.fd.rawValue)", "exactio.error": "\(error)", "exactio.pause_ms": "\(l.backoff / 1_000_000)"])
    }

    // MARK: - Timers

    /// Watches the connection's deadline: one timer per connection at a time, at the earliest
    /// deadline it was asked to watch (a reader's deadlines only move later: its timeout is
    /// fixed).
    private func watch(_ c: LoopConnection) {
        let d = c.state.withLock { $0.deadline }
        guard d > 0, c.timerAt == 0 || d < c.timerAt else { return }
        c.timerAt = d
        timers.insert(d, .deadline(c))
    }

    /// Nanoseconds until the nearest timer (nil: none). A deadline counts whether or not its
    /// reader waits yet: the reader publishes it before it suspends, and the loop must not
    /// sleep past it in between.
    private func untilNearestTimer() -> Int64? {
        guard let when = timers.nearest else { return nil }
        return max(1, when - now())
    }

    /// Fires the timers that are due: wakes readers whose deadline passed (and cancels their
    /// large read), starts accepting again after a pause.
    private func fireTimers() {
        guard timers.nearest != nil else { return }
        let now = now()
        var examined = 1  // the nearest, above
        defer { count { $0.timersExamined += examined } }
        while let (when, timer) = timers.popExpired(now: now) {
            examined += 1
            switch timer {
            case .deadline(let c):
                guard c.timerAt == when else { continue }  // stale: a later one replaced it
                c.timerAt = 0
                if c.detached { continue }
                switch c.expire(now: now) {
                case .none:
                    break
                case .pending(let later):
                    c.timerAt = later
                    timers.insert(later, .deadline(c))
                case .expired:
                    cancelLargeRead(c)
                }
            case .sendDeadline(let c):
                sendTimerFired(c, when: when, now: now)
            case .acceptRetry(let l):
                guard l.retryAt == when else { continue }
                l.retryAt = 0
                if !l.closing && !stopping && !l.paused && l.token.isAttached { accept(l) }
            }
        }
    }

    // MARK: - The turn

    func turn(block: Bool) {
        if failure != nil {
            // Commands are answered with the failure; the backend is not used again: the loop
            // sleeps on its eventfd until it is shut down.
            if block { waker.wait(milliseconds: 1000) }
            return
        }
        let timeout: Int64? = block ? untilNearestTimer() : 0
        let error = backend.turn(timeout: timeout, resolve: entry, into: &completions)
        let counters = backend.takeCounters()
        count { s in
            s.turns += 1
            s.statistics.enters += counters.enters
            s.statistics.completions += counters.completions
            s.statistics.reads += counters.reads
            s.statistics.sends += counters.sends
        }
        if let error {
            completions.removeAll(keepingCapacity: true)
            failForGood(error)
            return
        }
        for completion in completions { dispatch(completion) }
        completions.removeAll(keepingCapacity: true)
        fireTimers()
    }

    func countHeld() {
        count { $0.timersHeld = timers.count }
    }

    private func dispatch(_ completion: LoopCompletion) {
        switch completion {
        case .received(let c, let bytes, let end):
            received(c, bytes, end)
        case .read(let c, let n, let error):
            readCompleted(c, count: n, error: error)
        case .accepted(let l, let result):
            accepted(l, result)
        case .sent(let c, let n, let error, let notification):
            sendCompleted(c, count: n, error: error, notification: notification)
        case .sendReleased(let c, let id):
            sendReleased(c, id: id)
        }
    }

    // MARK: - Shutdown and failure

    /// Every reader is told the loop is going, and every request is ended; the loop's thread
    /// turns until each has completed (`isDrained`).
    func beginShutdown() {
        stopping = true
        for case let entry? in entries {
            switch entry {
            case .connection(let c):
                c.interrupt(shutDown: true)
                stopSending(c)
                disarm(c)
                if c.receive == .starved { unstarve(c) }
                if c.largeRead == .inFlight {
                    cancelLargeRead(c)
                } else if c.largeRead != .canceling {
                    c.largeRead = .idle
                    c.largeReadProgress(0, finished: true, error: .canceled)
                }
            case .listener(let l):
                stopAccepting(l)
            }
        }
        backend.cancelAll()
    }

    var isDrained: Bool { backend.inFlight <= 0 || failure != nil }

    func finishShutdown() {
        for case let entry? in entries {
            switch entry {
            // Descriptors of connections whose reader (and writer) is gone close now; the others
            // close when the last of them goes.
            case .connection(let c) where c.detached && (c.sender?.gone ?? true):
                c.fd.close()
                c.sender?.released()
            case .connection: break
            case .listener(let l):
                l.queue.finish()
                l.fd.close()
            }
        }
        quarantineHeldViews()
        // Forget every connection and listener (their objects hold the loop: a cycle otherwise).
        entries.removeAll()
        generations.removeAll()
        freeSlots.removeAll()
        timers.removeAll()
        starved.removeAll()
        pool.starved.store(false, ordering: .releasing)
        backend.close()
    }

    /// The kernel interface failed for good (`error`: an io_uring_enter or epoll_wait error
    /// that is not a passing one): every reader's pending call fails with it, accept sequences
    /// throw it; memory a large read in flight targets is given up (the kernel may still write
    /// it). From then on commands are answered with it, and `shutdown()` does not wait for
    /// requests the kernel can no longer confirm.
    func failForGood(_ error: Errno) {
        failure = error
        logger?.error("ExactIO loop failed: its kernel interface returned an error", metadata: ["exactio.error": "\(error)"])
        for case let entry? in entries {
            switch entry {
            case .connection(let c):
                failSending(c, error)
                c.fail(error, readInFlight: c.largeRead == .inFlight || c.largeRead == .canceling)
                c.receive = .idle
                c.largeRead = .idle
            case .listener(let l):
                l.closing = true
                l.inFlight = 0
                l.queue.finish(throwing: error)
            }
        }
        quarantineHeldViews()
    }

    /// `command` after a failure: nothing reaches the kernel.
    private func answerFailed(_ command: LoopCommand, _ error: Errno) {
        switch command {
        case .receive(let c), .largeRead(let c), .deadline(let c):
            c.fail(error, readInFlight: false)
        case .detach(let c):
            c.detached = true
            if !c.token.isAttached && c.senderDone { c.fd.close() }  // else: at shutdown
        case .listen(let l):
            l.queue.finish(throwing: error)
            l.fd.close()
        case .unlisten(let l):
            l.queue.finish()
        case .inspect(let reply):
            reply("(the loop failed: \(error))\n" + describe())
        case .send, .detachSender, .closeConnection:
            answerFailedSend(command, error)
        case .cancelLargeRead, .resumeAccept, .injectFailures, .shutdown, .cancelSend, .sendDeadline, .holdNotifications,
             .refuseZeroCopy:
            break
        }
    }

    /// What the table holds, for `IOLoop.debugState()` (the loop's thread).
    private func describe() -> String {
        var lines: [String] = []
        for case let entry? in entries {
            switch entry {
            case .connection(let c):
                let s = c.state.withLock { s in
                    "queued \(s.received.bytes) in \(s.received.count) segments, receiving \(s.receiving) eof \(s.eof) waiter \(s.waiter != nil) large read \(s.largeRead.map { "\($0.got)/\($0.minimum) done \($0.done)" } ?? "-")"
                }
                lines.append("conn \(c.token.slot): receive \(c.receive) large read \(c.largeRead) rearm \(c.rearmAfterDisarm) detached \(c.detached); \(s)\(describeSender(c))")
            case .listener(let l):
                lines.append("listener \(l.token.slot): in flight \(l.inFlight) paused \(l.paused) closing \(l.closing) retryAt \(l.retryAt)")
            }
        }
        lines.append("timers \(timers.count), starved \(starved.count), stopping \(stopping), in flight \(backend.inFlight)")
        return lines.joined(separator: "\n")
    }
}

/// What the loop's timers are for.
enum LoopTimer {
    /// A reader's deadline (`LoopConnection.timerAt` says which one is current).
    case deadline(LoopConnection)
    /// Accepting again after a shortage (`Listener.retryAt`).
    case acceptRetry(Listener)
    /// A writer's deadline (`LoopSender.timerAt`).
    case sendDeadline(LoopConnection)
}
