// TimerHeap: the loop's deadlines and back-offs, nearest first.

/// Timers ordered by when they fire, nearest first: a binary min-heap, so that a loop turn
/// costs O(1) to find its wait and O(log n) per timer that fires, however many are armed
/// (9,000 idle readers with a `readTimeout` cost a busy connection on the same loop nothing).
///
/// Entries are never removed early: whoever armed one records the time it armed, and a popped
/// entry whose time no longer matches is stale and dropped (lazy deletion).
struct TimerHeap<Element> {
    private var items: [(when: Int64, element: Element)] = []

    var count: Int { items.count }
    /// When the nearest timer fires (CLOCK_MONOTONIC ns), if any.
    var nearest: Int64? { items.first?.when }

    mutating func insert(_ when: Int64, _ element: Element) {
        items.append((when, element))
        var i = items.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            guard items[i].when < items[parent].when else { break }
            items.swapAt(i, parent)
            i = parent
        }
    }

    /// Removes and returns the nearest timer if it fires at or before `now`.
    mutating func popExpired(now: Int64) -> (when: Int64, element: Element)? {
        guard let top = items.first, top.when <= now else { return nil }
        let last = items.removeLast()
        if !items.isEmpty {
            items[0] = last
            var i = 0
            while true {
                let l = 2 * i + 1
                let r = l + 1
                var smallest = i
                if l < items.count && items[l].when < items[smallest].when { smallest = l }
                if r < items.count && items[r].when < items[smallest].when { smallest = r }
                if smallest == i { break }
                items.swapAt(i, smallest)
                i = smallest
            }
        }
        return top
    }

    mutating func removeAll() {
        items.removeAll()
    }
}
