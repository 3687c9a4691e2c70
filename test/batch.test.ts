// batchPerTurn (plugins/support.ts): lookups of one turn share a call, one call runs at a time,
// answers go to the right caller, and a failure stays inside its batch. The database uses
// (membership check, stream heads) are covered against PostgreSQL by the auth, replay and
// cluster tests.
import t from 'tap'
import { batchPerTurn } from '../plugins/support.ts'

function harness (options: { maxBatchSize?: number, fail?: (keys: readonly number[]) => boolean } = {}) {
  const calls: number[][] = []
  let running = 0
  let maxRunning = 0
  const gates: Array<() => void> = []
  const load = batchPerTurn<number, string>(async (keys) => {
    calls.push([...keys])
    running++
    maxRunning = Math.max(maxRunning, running)
    await new Promise<void>(resolve => gates.push(resolve))
    running--
    if (options.fail?.(keys)) throw new Error(`batch ${keys.join(',')} failed`)
    return keys.map(key => `v${key}`)
  }, options.maxBatchSize)
  const openGates = () => { for (const open of gates.splice(0)) open() }
  return { load, calls, openGates, maxRunning: () => maxRunning }
}

const nextTurn = () => new Promise(resolve => setImmediate(resolve))

t.test('lookups started in one turn share one call and get their own answers', async (t) => {
  const { load, calls, openGates } = harness()
  const answers = Promise.all([3, 1, 2].map(key => load(key)))
  await nextTurn()
  openGates()
  t.same(await answers, ['v3', 'v1', 'v2'])
  t.same(calls, [[3, 1, 2]])
})

t.test('lookups from separate callbacks of one turn are batched too', async (t) => {
  const { load, calls, openGates } = harness()
  // Two immediates queued together run in the same check phase, as handshakes arriving
  // together are handled in one poll phase: separate callbacks, one turn.
  const results = await new Promise<Array<Promise<string>>>(resolve => {
    const started: Array<Promise<string>> = []
    setImmediate(() => { started.push(load(1)) })
    setImmediate(() => { started.push(load(2)); resolve(started) })
  })
  let settled = false
  const all = Promise.all(results).finally(() => { settled = true })
  for (let i = 0; i < 10 && !settled; i++) {
    await nextTurn()
    openGates()
  }
  t.same(await all, ['v1', 'v2'])
  t.same(calls, [[1, 2]])
})

t.test('only one call runs at a time; lookups meanwhile gather into the next', async (t) => {
  const { load, calls, openGates, maxRunning } = harness()
  const first = load(1)
  await nextTurn()
  const later = [load(2), load(3)]
  await nextTurn()
  await nextTurn()
  t.same(calls, [[1]], 'the second batch waits for the running call')
  openGates()
  t.equal(await first, 'v1')
  await nextTurn()
  await nextTurn()
  t.same(calls, [[1], [2, 3]])
  openGates()
  t.same(await Promise.all(later), ['v2', 'v3'])
  t.equal(maxRunning(), 1)
})

t.test('maxBatchSize splits a large turn into calls of that size, run one after the other', async (t) => {
  const { load, calls, openGates } = harness({ maxBatchSize: 2 })
  const answers = Promise.all([1, 2, 3, 4, 5].map(key => load(key)))
  for (let i = 0; i < 10 && calls.length < 3; i++) {
    await nextTurn()
    openGates()
  }
  t.same(await answers, ['v1', 'v2', 'v3', 'v4', 'v5'])
  t.same(calls, [[1, 2], [3, 4], [5]])
})

t.test('a failed call rejects its own lookups only, and later batches still run', async (t) => {
  const { load, calls, openGates } = harness({ fail: keys => keys.includes(1) })
  const failing = [load(1), load(2)]
  await nextTurn()
  const next = load(3)
  openGates()
  const settled = await Promise.allSettled(failing)
  t.same(settled.map(s => s.status), ['rejected', 'rejected'])
  t.match((settled[0] as PromiseRejectedResult).reason.message, /batch 1,2 failed/)
  await nextTurn()
  await nextTurn()
  openGates()
  t.equal(await next, 'v3')
  t.same(calls, [[1, 2], [3]])
})
