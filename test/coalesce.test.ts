// Write coalescing on a plain Socket.IO server with real socket.io-client connections: frames
// of one turn go out in one socket write, in order; a slow client keeps engine.io's
// back-pressure; nothing is lost or reordered across turns, acks and disconnects.
import { createServer } from 'node:http'
import type { AddressInfo, Socket as NetSocket } from 'node:net'
import Fastify from 'fastify'
import t from 'tap'
import { Server } from 'socket.io'
import { coalesceWrites, type WriteCoalescer } from '../plugins/socket/coalesce.ts'
import erpSocket from '../plugins/socket/index.ts'
import { connect, record, sleep, spyOnWrites, waitFor, type TestLike } from './helpers.ts'

interface EngineSocket {
  transport: { writable: boolean, socket: { _socket: NetSocket } }
}
/** engine.io's connections (`io.engine.clients` is a plain object keyed by id). */
const engineSockets = (io: Server): EngineSocket[] => Object.values((io.engine as unknown as { clients: Record<string, EngineSocket> }).clients)

interface RawWrites {
  /** Chunks handed to the kernel per write system call, for the server side of one connection. */
  calls: number[]
}

async function setup (t: TestLike, options: { coalesce?: boolean, sliceSize?: number, perMessageDeflate?: boolean } = {}) {
  const http = createServer()
  const io = new Server(http, options.perMessageDeflate ? { perMessageDeflate: { threshold: 0 } } : {})
  const coalescer: WriteCoalescer | undefined = options.coalesce === false ? undefined : coalesceWrites(io, { sliceSize: options.sliceSize })
  io.on('connection', (socket) => {
    socket.join('room')
    socket.on('echo', (payload: unknown, ack: (answer: unknown) => void) => ack(payload))
  })
  await new Promise<void>(resolve => http.listen(0, '127.0.0.1', resolve))
  t.teardown(async () => {
    coalescer?.close()
    await io.close()
  })
  const url = `http://127.0.0.1:${(http.address() as AddressInfo).port}`
  /** Counts the writes of the server end of the only connection. */
  const spyOnConnection = (): RawWrites => ({ calls: spyOnWrites(engineSockets(io)[0]!.transport.socket._socket) })
  return { io, url, coalescer, spyOnWrites: spyOnConnection }
}

t.test('events broadcast in one turn reach a client in one socket write, in order', async (t) => {
  const { io, url, coalescer, spyOnWrites } = await setup(t)
  const client = await connect(t, url, undefined)
  const seen = record(client)
  const writes = spyOnWrites()
  for (let i = 1; i <= 5; i++) io.to('room').emit('tick', i)
  await waitFor(() => seen.length === 5, 5000, 'five ticks')
  t.same(seen.map(e => e.payload), [1, 2, 3, 4, 5], 'received in emit order')
  // A broadcast frame is one chunk (header and payload, built once per broadcast): five
  // chunks, one system call.
  t.same(writes.calls, [5], 'one write of all five frames')
  t.ok(coalescer!.stats.frames >= 5, 'the frames went through the coalescer')
  t.ok(coalescer!.stats.direct >= 5, 'written directly, not through engine.io\'s packet queue')
})

t.test('without coalescing the same burst costs one write per event (the baseline)', async (t) => {
  const { io, url, spyOnWrites } = await setup(t, { coalesce: false })
  const client = await connect(t, url, undefined)
  const seen = record(client)
  const writes = spyOnWrites()
  for (let i = 1; i <= 5; i++) io.to('room').emit('tick', i)
  await waitFor(() => seen.length === 5, 5000, 'five ticks')
  t.same(seen.map(e => e.payload), [1, 2, 3, 4, 5])
  t.ok(writes.calls.length >= 2, `engine.io writes separately (${writes.calls.length} writes)`)
})

t.test('events of separate turns are not delayed to a later turn', async (t) => {
  const { io, url, spyOnWrites } = await setup(t)
  const client = await connect(t, url, undefined)
  const seen = record(client)
  const writes = spyOnWrites()
  for (let i = 1; i <= 3; i++) {
    io.to('room').emit('tick', i)
    await waitFor(() => seen.length === i, 5000, `tick ${i}`)
  }
  t.same(seen.map(e => e.payload), [1, 2, 3])
  t.same(writes.calls, [1, 1, 1], 'one write per turn, each as soon as the turn ends')
})

t.test('acks and server-to-client events interleave correctly', async (t) => {
  const { io, url } = await setup(t)
  const client = await connect(t, url, undefined)
  const seen = record(client)
  const answers = await Promise.all(Array.from({ length: 20 }, (_, i) => {
    io.to('room').emit('tick', i)
    return client.timeout(5000).emitWithAck('echo', { i })
  }))
  t.same(answers, Array.from({ length: 20 }, (_, i) => ({ i })), 'every ack answered with its own payload')
  await waitFor(() => seen.length === 20, 5000, 'twenty ticks')
  t.same(seen.map(e => e.payload), Array.from({ length: 20 }, (_, i) => i))
})

t.test('a client that stops reading gets engine.io back-pressure, then everything in order', async (t) => {
  const { io, url, coalescer } = await setup(t)
  const client = await connect(t, url, undefined)
  const seen = record(client)
  const clientRaw = (client.io.engine.transport as unknown as { ws: { _socket: NetSocket } }).ws._socket
  clientRaw.pause()
  const engineSocket = engineSockets(io)[0]!
  const big = 'x'.repeat(1 << 20)
  // 16 MB in one turn is more than the kernel buffers of a loopback connection hold.
  for (let i = 0; i < 16; i++) io.to('room').emit('big', i, big)
  await sleep(50)
  t.ok(engineSocket.transport.socket._socket.writableLength > 0, 'data waits in user space')
  const direct = coalescer!.stats.direct
  // With data unsent the next broadcast goes through engine.io, whose write callback now waits
  // for everything before it.
  io.to('room').emit('after', 'late')
  await sleep(50)
  t.equal(coalescer!.stats.direct, direct, 'not written directly while the client lags')
  t.equal(engineSocket.transport.writable, false, 'engine.io holds further packets until the writes complete')
  io.to('room').emit('after', 'later')
  t.ok((engineSocket as unknown as { writeBuffer: unknown[] }).writeBuffer.length > 0, 'held in engine.io\'s queue')
  clientRaw.resume()
  await waitFor(() => seen.length === 18, 20000, 'all 18 events')
  t.same(seen.map(e => e.payload), [...Array.from({ length: 16 }, (_, i) => i), 'late', 'later'], 'in order, none lost')
  await waitFor(() => engineSocket.transport.writable, 5000, 'writable again')
  io.to('room').emit('after', 'caught up')
  await waitFor(() => seen.length === 19, 5000, 'an event after the client caught up')
  t.ok(coalescer!.stats.direct > direct, 'written directly again once nothing is unsent')
})

t.test('a broadcast and an emit to one socket in the same turn keep their order', async (t) => {
  const { io, url, coalescer, spyOnWrites } = await setup(t)
  const client = await connect(t, url, undefined)
  const seen = record(client)
  const writes = spyOnWrites()
  const [socket] = await io.fetchSockets()
  const direct = coalescer!.stats.direct
  io.to('room').emit('tick', 1)
  socket!.emit('tick', 2)
  io.to('room').emit('tick', 3)
  await waitFor(() => seen.length === 3, 5000, 'three ticks')
  t.same(seen.map(e => e.payload), [1, 2, 3], 'the socket\'s own emit between the broadcasts')
  t.equal(coalescer!.stats.direct - direct, 2, 'the broadcasts written directly')
  // 1 + 2 (engine.io's header and payload) + 1 chunks in one system call.
  t.same(writes.calls, [4])
})

t.test('a broadcast with binary attachments goes through engine.io', async (t) => {
  const { io, url, coalescer } = await setup(t)
  const client = await connect(t, url, undefined)
  const seen = record(client)
  const direct = coalescer!.stats.direct
  io.to('room').emit('blob', Buffer.from([1, 2, 3]))
  io.to('room').emit('tick', 1)
  await waitFor(() => seen.length === 2, 5000, 'both events')
  t.same([...new Uint8Array(seen[0]!.payload as ArrayBuffer)], [1, 2, 3], 'the attachment arrives whole')
  t.equal(seen[1]!.payload, 1)
  t.equal(coalescer!.stats.direct - direct, 1, 'only the text frame was written directly')
})

t.test('after close() writes go out directly and connections keep working', async (t) => {
  const { io, url, coalescer, spyOnWrites } = await setup(t)
  const client = await connect(t, url, undefined)
  const seen = record(client)
  const writes = spyOnWrites()
  io.to('room').emit('tick', 1)
  coalescer!.close()
  await waitFor(() => seen.length === 1, 5000, 'the pending tick, flushed by close()')
  io.to('room').emit('tick', 2)
  await waitFor(() => seen.length === 2, 5000, 'a tick after close')
  t.same(seen.map(e => e.payload), [1, 2])
  // The first tick was a direct broadcast frame (one chunk); after close engine.io writes
  // header and payload itself.
  t.same(writes.calls, [1, 2])
  const late = await connect(t, url, undefined)
  const lateSeen = record(late)
  io.to('room').emit('tick', 3)
  await waitFor(() => lateSeen.length === 1, 5000, 'a connection made after close')
  t.same(lateSeen[0]?.payload, 3)
})

t.test('a connection that closes with frames pending is dropped from the batch', async (t) => {
  const { io, url, coalescer } = await setup(t)
  const a = await connect(t, url, undefined)
  const b = await connect(t, url, undefined)
  const seenB = record(b)
  const engineA = engineSockets(io)[0]!
  io.to('room').emit('tick', 1)
  engineA.transport.socket._socket.destroy()
  io.to('room').emit('tick', 2)
  await waitFor(() => seenB.length === 2, 5000, 'both ticks on the other connection')
  await waitFor(() => !a.connected, 5000, 'the destroyed connection to be noticed')
  t.same(seenB.map(e => e.payload), [1, 2])
  coalescer!.flush()
  t.pass('flushing again after the close does not throw')
})

t.test('a broadcast to more connections than a slice is written over several turns, I/O in between', async (t) => {
  const { io, url, coalescer } = await setup(t, { sliceSize: 2 })
  const clients = await Promise.all(Array.from({ length: 5 }, () => connect(t, url, undefined)))
  const seen = clients.map(client => record(client))
  const before = coalescer!.stats.connections
  io.to('room').emit('tick', 1)
  // Queued after the first slice's callback: runs between the first and the second slice.
  const afterFirstSlice = await new Promise<number>(resolve => setImmediate(() => resolve(coalescer!.stats.connections - before)))
  t.equal(afterFirstSlice, 2, 'the first slice wrote two connections, the rest waited for the next turn')
  await waitFor(() => seen.every(s => s.length === 1), 5000, 'every client')
  t.equal(coalescer!.stats.connections - before, 5, 'each connection written once')
  t.same(seen.map(s => s[0]?.payload), [1, 1, 1, 1, 1])
})

t.test('connections with permessage-deflate are left to engine.io', async (t) => {
  const { io, url, coalescer } = await setup(t, { perMessageDeflate: true })
  const client = await connect(t, url, undefined, { perMessageDeflate: { threshold: 0 } } as never)
  const seen = record(client)
  const transport = engineSockets(io)[0]!.transport as unknown as { socket: { extensions: string } }
  t.match(transport.socket.extensions, /permessage-deflate/, 'compression was negotiated')
  for (let i = 1; i <= 3; i++) io.to('room').emit('tick', i)
  await waitFor(() => seen.length === 3, 5000, 'three ticks')
  t.same(seen.map(e => e.payload), [1, 2, 3])
  t.equal(coalescer!.stats.frames, 0, 'nothing went through the coalescer')
})

t.test('a connection that starts on polling is coalesced once it upgrades to WebSocket', async (t) => {
  const { io, url, coalescer, spyOnWrites } = await setup(t)
  const client = await connect(t, url, undefined, { transports: ['polling', 'websocket'] })
  await waitFor(() => client.io.engine.transport.name === 'websocket', 5000, 'the upgrade')
  await waitFor(() => (engineSockets(io)[0]!.transport as unknown as { name: string }).name === 'websocket', 5000, 'the server side of the upgrade')
  const seen = record(client)
  const writes = spyOnWrites()
  const before = coalescer!.stats.frames
  for (let i = 1; i <= 3; i++) io.to('room').emit('tick', i)
  await waitFor(() => seen.length === 3, 5000, 'three ticks')
  t.same(seen.map(e => e.payload), [1, 2, 3])
  t.same(writes.calls, [3], 'one write for the three frames')
  t.equal(coalescer!.stats.frames - before, 3)
})

t.test('erp-socket option coalesceWrites: { sliceSize } sets the slice, false leaves engine.io as it is', async (t) => {
  for (const coalesce of [{ sliceSize: 2 }, false] as const) {
    const app = Fastify()
    await app.register(erpSocket, { coalesceWrites: coalesce })
    t.teardown(() => app.close())
    await app.listen({ port: 0, host: '127.0.0.1' })
    const url = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`
    const clients = await Promise.all(Array.from({ length: 5 }, () => connect(t, url, undefined)))
    const seen = clients.map(client => record(client))
    const raws = engineSockets(app.io).map(s => s.transport.socket._socket)
    app.io.emit('server:shutdown', { message: 'tick' })
    const corkedAfterEmit = raws.filter(raw => raw.writableCorked > 0).length
    const corkedAfterOneTurn = await new Promise<number>(resolve => setImmediate(() => resolve(raws.filter(raw => raw.writableCorked > 0).length)))
    if (coalesce) {
      t.equal(corkedAfterEmit, 5, 'every connection holds its frame for the turn')
      t.equal(corkedAfterOneTurn, 3, 'the first slice wrote two connections')
    } else {
      t.equal(corkedAfterEmit, 0, 'not coalesced: written at once')
    }
    await waitFor(() => seen.every(s => s.length === 1), 5000, 'every client')
    await app.close()
  }
})
