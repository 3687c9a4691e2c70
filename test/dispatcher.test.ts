// The per-stream sequencer in isolation: its log reader is a function, so gap filling,
// reordering and failures can be driven exactly. (The database paths are covered by
// test/replay.test.ts and the cluster tests against PostgreSQL.)
import t from 'tap'
import { Dispatcher } from '../plugins/offline-queue/dispatcher.ts'
import { Semaphore } from '../plugins/offline-queue/semaphore.ts'
import type { Envelope, Stream } from '../plugins/events.ts'

const stream: Stream = 'company:c1'
const envelope = (seq: number, s: Stream = stream): Envelope => ({
  id: `${s}#${seq}`, stream: s, seq, type: 'project:deleted', companyId: 'c1', at: new Date(0).toISOString(), actor: { userId: null }, data: {}
})

function harness (options: { listeners?: boolean, log?: Envelope[], failReads?: number } = {}) {
  const delivered: number[] = []
  const errors: unknown[] = []
  const reads: Array<[number, number]> = []
  const log = options.log ?? Array.from({ length: 50 }, (_, i) => envelope(i + 1))
  let failures = options.failReads ?? 0
  let listeners = options.listeners ?? true
  let release: (() => void) | undefined
  const dispatcher = new Dispatcher({
    hasListeners: () => listeners,
    deliver: (e) => { delivered.push(e.seq) }
  }, async (s, after, limit) => {
    reads.push([after, limit])
    if (release === undefined) await new Promise<void>(resolve => { release = resolve })
    if (failures-- > 0) throw new Error('database down')
    return log.filter(e => e.stream === s && e.seq > after).slice(0, limit)
  }, (err) => { errors.push(err) }, 3)
  return {
    dispatcher,
    delivered,
    errors,
    reads,
    setListeners (value: boolean) { listeners = value },
    /** Lets the (first) log read finish; later reads run at once. */
    unblock () { release?.(); release ??= () => {} }
  }
}

const flush = () => new Promise(resolve => setImmediate(resolve))

t.test('delivers in order, drops duplicates', async t => {
  const h = harness()
  h.unblock()
  h.dispatcher.ingest([envelope(1), envelope(2), envelope(2), envelope(1), envelope(3)])
  t.same(h.delivered, [1, 2, 3])
  t.same(h.reads, [])
  t.equal(h.dispatcher.lastDelivered(stream), 3)
})

t.test('a jump is filled from the log in pages, and events arriving meanwhile wait their turn', async t => {
  const h = harness()
  h.dispatcher.ingest([envelope(1), envelope(9)])
  h.dispatcher.ingest([envelope(11), envelope(10), envelope(9), envelope(4)])
  t.same(h.delivered, [1], 'nothing after the gap goes out before the gap is filled')
  h.unblock()
  await flush()
  await flush()
  t.same(h.delivered, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
  t.same(h.reads, [[1, 3], [4, 3], [7, 1]], 'paged by pageSize, bounded by the gap')
})

t.test('a failed or short read skips the gap instead of retrying forever', async t => {
  const failing = harness({ failReads: 1 })
  failing.dispatcher.ingest([envelope(1), envelope(5)])
  failing.unblock()
  await flush()
  t.same(failing.delivered, [1, 5])
  t.equal(failing.errors.length, 1)

  const pruned = harness({ log: [envelope(1), envelope(4), envelope(5)] })
  pruned.dispatcher.ingest([envelope(1), envelope(6)])
  pruned.unblock()
  await flush()
  t.same(pruned.delivered, [1, 4, 5, 6], 'what the log still has, then on')
})

// Regression (review): when the whole gap was pruned and the log held at least a page of later
// events, every read returned only rows past the gap, none advanced the stream, and the fill read
// the same page forever (the stream stuck, its pending events growing, resumes never acked).
t.test('a gap pruned whole, with a full page of later events in the log, ends the fill instead of reading forever', async t => {
  const log = [1, 2, 3, ...Array.from({ length: 15 }, (_, i) => i + 7)].map(seq => envelope(seq))
  const h = harness({ log })
  h.dispatcher.ingest([envelope(1), envelope(2), envelope(3), envelope(7)])
  h.unblock()
  await flush()
  t.same(h.delivered, [1, 2, 3, 7], 'the pruned seqs are skipped, then on')
  t.equal(h.reads.length, 1, 'one read: it advanced nothing, so the range is gone')
})

t.test('without local listeners a jump is accepted without reading the log', async t => {
  const h = harness({ listeners: false })
  h.dispatcher.ingest([envelope(1), envelope(7)])
  t.same(h.delivered, [1, 7])
  t.same(h.reads, [])
})

t.test('catchUp: a new stream starts at the head; a known one is filled up to it', async t => {
  const h = harness()
  h.unblock()
  await h.dispatcher.catchUp(stream, 4)
  t.same(h.delivered, [], 'a node that starts re-emits nothing')
  t.equal(h.dispatcher.lastDelivered(stream), 4)
  await h.dispatcher.catchUp(stream, 7)
  t.same(h.delivered, [5, 6, 7])
  await h.dispatcher.catchUp(stream, 7)
  t.same(h.delivered, [5, 6, 7], 'at the head: nothing to do')
  h.setListeners(false)
  await h.dispatcher.catchUp(stream, 9)
  t.same(h.delivered, [5, 6, 7], 'nobody listening: move on without reading')
  t.equal(h.dispatcher.lastDelivered(stream), 9)
})

t.test('catchUp with skipUnread: false leaves a stream where a failed read stopped, so late copies are still delivered', async t => {
  const h = harness({ failReads: 1 })
  h.unblock()
  h.dispatcher.ingest([envelope(1)])
  await h.dispatcher.catchUp(stream, 4, { skipUnread: false })
  t.equal(h.errors.length, 1, 'the read failed')
  t.equal(h.dispatcher.lastDelivered(stream), 1, 'not moved past what was delivered')
  h.dispatcher.ingest([envelope(2), envelope(3), envelope(4)])
  t.same(h.delivered, [1, 2, 3, 4], 'the copies that arrive later go out')

  const skipping = harness({ failReads: 1 })
  skipping.unblock()
  skipping.dispatcher.ingest([envelope(1)])
  await skipping.dispatcher.catchUp(stream, 4)
  t.equal(skipping.dispatcher.lastDelivered(stream), 4, 'by default what cannot be read is skipped')
  skipping.dispatcher.ingest([envelope(2), envelope(3), envelope(4)])
  t.same(skipping.delivered, [1])
})

t.test('catchUp waits for a running fill first', async t => {
  const h = harness()
  h.dispatcher.ingest([envelope(1), envelope(4)])
  const caughtUp = h.dispatcher.catchUp(stream, 6)
  h.unblock()
  await caughtUp
  t.same(h.delivered, [1, 2, 3, 4, 5, 6])
})

t.test('sweep forgets idle streams only', async t => {
  const h = harness()
  h.unblock()
  h.dispatcher.ingest([envelope(1), envelope(1, 'user:u1')])
  t.equal(h.dispatcher.size, 2)
  h.dispatcher.sweep()
  t.equal(h.dispatcher.size, 2, 'streams with listeners stay')
  h.setListeners(false)
  h.dispatcher.sweep()
  t.equal(h.dispatcher.size, 0)
})

t.test('the semaphore runs at most `limit` jobs at once, in arrival order', async t => {
  const semaphore = new Semaphore(2)
  let running = 0
  let peak = 0
  const order: number[] = []
  await Promise.all(Array.from({ length: 6 }, (_, i) => semaphore.run(async () => {
    running++
    peak = Math.max(peak, running)
    await flush()
    order.push(i)
    running--
  })))
  t.equal(peak, 2)
  t.same(order, [0, 1, 2, 3, 4, 5])
  await t.rejects(semaphore.run(async () => { throw new Error('job failed') }), /job failed/)
  t.equal(await semaphore.run(async () => 'still usable'), 'still usable')
})

t.test('track: a stream is followed from the head read before the first local socket joins', async t => {
  const h = harness()
  h.unblock()
  let release!: (head: number) => void
  const tracking = h.dispatcher.track(stream, () => new Promise<number>(resolve => { release = resolve }))
  // Regression: a node that first saw a stream through a later event (seq 2 from itself before
  // seq 1 from another node) started there and dropped seq 1 as a duplicate.
  h.dispatcher.ingest([envelope(2)])
  t.same(h.delivered, [], 'events wait while the head is read')
  release(0)
  await tracking
  await flush()
  t.same(h.delivered, [1, 2], 'the missing seq 1 was filled from the log, then seq 2')
  let reads = 0
  await h.dispatcher.track(stream, async () => { reads++; return 99 })
  t.equal(reads, 0, 'a followed stream is not read again')
  h.dispatcher.ingest([envelope(3)])
  t.same(h.delivered, [1, 2, 3])
})

t.test('track: a failed head read leaves the stream to start at its first event', async t => {
  const h = harness()
  h.unblock()
  await h.dispatcher.track(stream, async () => { throw new Error('database down') })
  t.equal(h.errors.length, 1)
  h.dispatcher.ingest([envelope(5), envelope(6)])
  t.same(h.delivered, [5, 6])
})
