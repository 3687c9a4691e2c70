// Presence behaviours shared by the memory-store and Redis-store test files: the same
// assertions must hold whichever store is behind the plugin.
import type { Test } from 'tap'
import type { Socket as ClientSocket } from 'socket.io-client'
import type { PresenceChanged, PresenceEntry } from '../plugins/events.ts'
import type { Departure, PresenceStore } from '../plugins/presence/store.ts'
import { connect, request, sleep, waitFor, type TestCompany, type TestLike } from './helpers.ts'

/** Short timings so grace and expiry happen within a test (ttl >= 2 × heartbeat). */
export const FAST = { graceMs: 400, heartbeatMs: 50, ttlMs: 300, sweepIntervalMs: 50 }

export interface Watcher {
  socket: ClientSocket
  /** Every presence:changed received, with its arrival time. */
  changes: Array<PresenceChanged & { receivedAt: number }>
  /** The changes about one user, without `at`/`rev`/`receivedAt` (for deep equality). */
  about (userId: string): Array<Omit<PresenceChanged, 'at' | 'rev'>>
  /** The revs of the changes about one user, in arrival order. */
  revs (userId: string): number[]
}

/** Whether revs only ever go up (what a client applying them in arrival order needs). */
export const increasing = (revs: number[]): boolean => revs.every((rev, i) => i === 0 || rev > revs[i - 1]!)

/** Connects a client that records every presence:changed it receives. */
export async function watch (t: TestLike, url: string, token: string): Promise<Watcher> {
  const socket = await connect(t, url, token)
  const changes: Watcher['changes'] = []
  socket.on('presence:changed', (change: PresenceChanged) => { changes.push({ ...change, receivedAt: Date.now() }) })
  return {
    socket,
    changes,
    about: userId => changes.filter(c => c.userId === userId).map(({ at: _at, rev: _rev, receivedAt: _r, ...rest }) => rest),
    revs: userId => changes.filter(c => c.userId === userId).map(c => c.rev)
  }
}

export async function list (socket: ClientSocket): Promise<PresenceEntry[]> {
  const answer = await request(socket, 'presence:list')
  if (!answer.ok) throw new Error(`presence:list failed: ${JSON.stringify(answer)}`)
  return answer.users
}

export const entryOf = async (socket: ClientSocket, userId: string) => (await list(socket)).find(u => u.userId === userId)

/** Two devices of one user: one online event, devices 2, devices 1, offline only after the grace. */
export async function twoDevicesThenGrace (t: Test, url: string, company: TestCompany, graceMs: number): Promise<void> {
  const observer = await watch(t, url, company.as('admin').token)
  const subject = company.as('member')

  const phone = await connect(t, url, subject.token)
  await waitFor(() => observer.about(subject.id).length === 1, 5000, 'the online event')
  const laptop = await connect(t, url, subject.token)
  await waitFor(() => observer.about(subject.id).length === 2, 5000, 'devices: 2')
  t.same(observer.about(subject.id), [
    { userId: subject.id, status: 'online', devices: 1 },
    { userId: subject.id, status: 'online', devices: 2 }
  ], 'one online event, then devices: 2')
  t.match(await entryOf(observer.socket, subject.id), { status: 'online', devices: 2, since: String, rev: observer.revs(subject.id)[1] },
    'the list entry carries the rev of the last change announced')

  phone.disconnect()
  await waitFor(() => observer.about(subject.id).length === 3, 5000, 'devices: 1')
  t.same(observer.about(subject.id)[2], { userId: subject.id, status: 'online', devices: 1 }, 'one device left: devices 1, not offline')

  const lastGone = Date.now()
  laptop.disconnect()
  await sleep(graceMs / 2)
  t.equal(observer.about(subject.id).length, 3, 'nothing announced while the grace period runs')
  t.match(await entryOf(observer.socket, subject.id), { status: 'online', devices: 0 }, 'still listed during the grace period, with no device')

  await waitFor(() => observer.about(subject.id).length === 4, graceMs + 5000, 'the offline event')
  const offline = observer.changes.filter(c => c.userId === subject.id)[3]!
  t.same(observer.about(subject.id)[3], { userId: subject.id, status: 'offline', devices: 0 })
  t.ok(increasing(observer.revs(subject.id)), `revs only go up: ${observer.revs(subject.id).join(', ')}`)
  t.ok(offline.receivedAt - lastGone >= graceMs, `offline came ${offline.receivedAt - lastGone} ms after the last device left, not before the ${graceMs} ms grace`)
  t.type(offline.at, 'string')
  t.equal(await entryOf(observer.socket, subject.id), undefined, 'no longer listed')

  // Back after being offline, once nodes have forgotten the user (FAST.ttlMs after the offline):
  // a rev above the offline's, so a late copy of an earlier state can never win.
  await sleep(FAST.ttlMs + 50)
  await connect(t, url, subject.token)
  await waitFor(() => observer.about(subject.id).length === 5, 5000, 'online again')
  t.same(observer.about(subject.id)[4], { userId: subject.id, status: 'online', devices: 1 })
  t.ok(observer.revs(subject.id)[4]! > offline.rev, 'the rev keeps growing across offline and back')
}

/** Disconnect and reconnect inside the grace period: no event at all, status kept. */
export async function reconnectInsideGrace (t: Test, url: string, company: TestCompany, graceMs: number, reconnectUrl = url): Promise<void> {
  const observer = await watch(t, url, company.as('admin').token)
  const subject = company.as('member')

  const first = await connect(t, url, subject.token)
  t.same(await request(first, 'presence:set', { status: 'away' }), { ok: true })
  await waitFor(() => observer.about(subject.id).length === 2, 5000, 'online then away')
  const before = await entryOf(observer.socket, subject.id)

  first.disconnect()
  await sleep(graceMs / 4)
  const second = await connect(t, reconnectUrl, subject.token)
  // Wait well past the end of the first grace period.
  await sleep(graceMs * 2)
  t.same(observer.about(subject.id), [
    { userId: subject.id, status: 'online', devices: 1 },
    { userId: subject.id, status: 'away', devices: 1 }
  ], 'the lift doors closing and opening again announced nothing')
  const { rev: revAfter, ...after } = (await entryOf(observer.socket, subject.id))!
  const { rev: revBefore, ...unchanged } = before!
  t.same(after, unchanged, 'same status, devices and since as before the drop')
  t.ok(revAfter > revBefore, 'the drop and the reconnect still moved the rev (they are mutations, just not announced)')
  second.disconnect()
}

/** Presence never crosses companies: events, lists and sets stay in their company. */
export async function companiesStayApart (t: Test, urls: [string, string], acme: TestCompany, globex: TestCompany): Promise<void> {
  const acmeObserver = await watch(t, urls[0], acme.as('admin').token)
  const globexObserver = await watch(t, urls[1], globex.as('admin').token)
  const acmeMember = await connect(t, urls[1], acme.as('member').token)
  const globexMember = await connect(t, urls[0], globex.as('member').token)
  t.same(await request(acmeMember, 'presence:set', { status: 'busy', viewing: { type: 'project', id: 'p-1' } }), { ok: true })
  t.same(await request(globexMember, 'presence:set', { status: 'away' }), { ok: true })
  await waitFor(() => acmeObserver.about(acme.as('member').id).length === 2 && globexObserver.about(globex.as('member').id).length === 2, 5000, 'both companies’ events')
  await sleep(200)

  const acmeIds = new Set(acme.users.map(u => u.id))
  const globexIds = new Set(globex.users.map(u => u.id))
  t.ok(acmeObserver.changes.every(c => acmeIds.has(c.userId)), 'acme saw only acme users')
  t.ok(globexObserver.changes.every(c => globexIds.has(c.userId)), 'globex saw only globex users')
  const acmeList = await list(acmeObserver.socket)
  const globexList = await list(globexObserver.socket)
  t.same(acmeList.map(u => u.userId).sort(), [acme.as('admin').id, acme.as('member').id].sort(), 'acme lists its two connected users')
  t.same(globexList.map(u => u.userId).sort(), [globex.as('admin').id, globex.as('member').id].sort(), 'globex lists its two connected users')
  t.match(acmeList.find(u => u.userId === acme.as('member').id), { status: 'busy', viewing: { type: 'project', id: 'p-1' } })
  t.match(globexList.find(u => u.userId === globex.as('member').id), { status: 'away' })
}

/** Bad presence:set payloads: VALIDATION_FAILED ack, nothing announced, state unchanged. */
export async function badPayloadsChangeNothing (t: Test, url: string, company: TestCompany): Promise<void> {
  const observer = await watch(t, url, company.as('admin').token)
  const subject = company.as('member')
  const socket = await connect(t, url, subject.token)
  t.same(await request(socket, 'presence:set', { status: 'busy', viewing: { type: 'project', id: 'p-9' } }), { ok: true })
  await waitFor(() => observer.about(subject.id).length === 2, 5000, 'online then busy')
  const before = await list(observer.socket)

  const bad: unknown[] = [
    undefined,
    null,
    'away',
    42,
    [],
    {},
    { status: 'offline' },
    { status: 'invisible' },
    { status: 'AWAY' },
    { status: 'away', extra: true },
    { status: 'away', viewing: 'project' },
    { status: 'away', viewing: { type: 'project' } },
    { status: 'away', viewing: { type: '', id: '1' } },
    { status: 'away', viewing: { type: 'project', id: 'x'.repeat(129) } },
    { status: 'away', viewing: { type: 'project', id: '1', companyId: 'other' } },
    // Lone surrogates: the Redis store's Lua refused them, answering a retryable SERVICE_UNAVAILABLE.
    { status: 'away', viewing: { type: 'project', id: 'a\ud800b' } },
    { status: 'away', viewing: { type: '\udc00project', id: '1' } },
    { status: 'away', userId: company.as('admin').id },
    { status: ['away'] }
  ]
  for (const payload of bad) {
    const answer = payload === undefined ? await request(socket, 'presence:set') : await request(socket, 'presence:set', payload)
    t.equal(answer.ok, false, `refused ${JSON.stringify(payload)}`)
    t.equal(answer.error?.code, 'VALIDATION_FAILED', `VALIDATION_FAILED for ${JSON.stringify(payload)}`)
    t.type(answer.error?.message, 'string')
  }
  await sleep(150)
  t.equal(observer.about(subject.id).length, 2, 'no presence:changed for refused payloads')
  t.same(await list(observer.socket), before, 'presence unchanged')
  t.ok(socket.connected, 'the socket stays connected')
}

/**
 * Store level: every mutation that changes a user's presence takes a higher rev, in the results
 * and in the list; a set that changes nothing takes none; offline and back keeps growing.
 */
export async function storeRevisionsOnlyGrow (t: Test, store: PresenceStore, companyId: string): Promise<void> {
  const phone = { companyId, userId: 'u-1', socketId: `${companyId}-phone` }
  const laptop = { ...phone, socketId: `${companyId}-laptop` }
  const listedRev = async () => (await store.list(companyId)).find(u => u.userId === 'u-1')?.rev
  const revs: number[] = []
  const took = (rev: number | undefined, what: string) => {
    t.ok(rev !== undefined && rev > (revs.at(-1) ?? 0), `${what} takes a higher rev (${rev} after ${revs.at(-1)})`)
    revs.push(rev!)
  }

  const first = await store.connect(phone, 60_000)
  t.equal(first.before, null)
  took(first.after.rev, 'the first device')
  const second = await store.connect(laptop, 60_000)
  t.equal(second.before?.rev, first.after.rev, 'before carries the previous rev')
  took(second.after.rev, 'the second device')
  t.equal(await listedRev(), second.after.rev, 'the list entry has the current rev')

  const busy = await store.set(companyId, 'u-1', { status: 'busy', viewing: { type: 'project', id: 'p-1' } })
  took(busy?.after.rev, 'a status change')
  const same = await store.set(companyId, 'u-1', { status: 'busy', viewing: { type: 'project', id: 'p-1' } })
  t.equal(same?.after.rev, busy?.after.rev, 'a set that changes nothing takes no rev')
  const kept = await store.set(companyId, 'u-1', { status: 'busy' })
  t.equal(kept?.after.rev, busy?.after.rev, 'an omitted viewing changes nothing either')
  const cleared = await store.set(companyId, 'u-1', { status: 'busy', viewing: null })
  took(cleared?.after.rev, 'clearing viewing')
  t.same(await store.set(companyId, 'u-1', { status: 'busy', viewing: null }), { before: cleared?.after, after: cleared?.after }, 'clearing it again changes nothing')
  const viewing = await store.set(companyId, 'u-1', { status: 'busy', viewing: { type: 'project', id: 'p-2' } })
  took(viewing?.after.rev, 'a viewing change')

  // A store that keeps its data answers a departure with the user's state.
  const departed = (departure: Departure | null) => {
    if (!departure || departure.after === null) throw new Error(`expected a departure, got ${JSON.stringify(departure)}`)
    return departure
  }
  const oneLeft = departed(await store.disconnect(phone, 60_000))
  took(oneLeft.after.rev, 'a device leaving')
  const lastLeft = departed(await store.disconnect(laptop, 60_000))
  t.type(lastLeft?.graceUntil, 'number')
  took(lastLeft?.after.rev, 'the last device leaving (grace starts)')
  t.equal(await store.endGrace(companyId, 'u-1', lastLeft!.graceUntil! + 1), null, 'a grace period that is not this one is not ended')
  const offline = await store.endGrace(companyId, 'u-1', lastLeft!.graceUntil!)
  took(offline?.rev, 'going offline')
  t.equal(await store.endGrace(companyId, 'u-1', lastLeft!.graceUntil!), null, 'ended once only')
  t.equal(await listedRev(), undefined, 'no longer listed')

  const back = await store.connect(phone, 0)
  t.equal(back.before, null, 'a fresh entry')
  took(back.after.rev, 'coming back after offline')

  // Expiry: the socket above is due at once (ttl 0); one for the devices left, one for offline.
  await store.connect(laptop, 0)
  revs.push((await store.list(companyId))[0]!.rev)
  const expired = (await store.sweep(100)).filter(e => e.companyId === companyId)
  t.equal(expired.length, 2, 'both expired sockets claimed')
  t.match(expired.map(e => e.after?.devices ?? 'offline').sort(), [1, 'offline'].sort())
  for (const item of [...expired].sort((a, b) => a.rev - b.rev)) took(item.rev, `expiry (${item.after ? 'devices' : 'offline'})`)
  t.ok(expired.every(e => e.after === null || e.after.rev === e.rev), 'an expiry with devices left carries its rev in after too')

  // A grace period ended by a sweep (another node's) takes a rev too.
  await store.connect(phone, 60_000)
  revs.push((await store.list(companyId))[0]!.rev)
  await store.disconnect(phone, 0)
  revs.push((await store.list(companyId))[0]!.rev)
  const swept = (await store.sweep(100)).filter(e => e.companyId === companyId)
  t.match(swept, [{ userId: 'u-1', after: null }], 'the grace period swept: offline')
  took(swept[0]?.rev, 'offline through a sweep')
  t.ok(increasing(revs), `revs: ${revs.join(', ')}`)
}
