import type { Socket as NetSocket } from 'node:net'
import type { Server } from 'socket.io'

/** The parts of engine.io's WebSocket transport this module relies on (engine.io 6). */
interface WebSocketTransport {
  name: string
  writable: boolean
  send (packets: unknown[]): void
  socket?: { _socket?: NetSocket, extensions?: string }
}

interface EngineSocket {
  transport: WebSocketTransport
  readyState: string
  writeBuffer: unknown[]
  on (event: 'upgrade', listener: (this: EngineSocket) => void): unknown
}

/** The parts of socket.io's Client this module relies on (socket.io 4). */
interface SocketIoClient {
  conn: EngineSocket
  writeToEngine (encodedPackets: unknown, opts: { wsPreEncodedFrame?: Buffer[] }): void
}

export interface CoalesceOptions {
  /**
   * Connections written per slice of a flush; the event loop handles I/O (database answers,
   * HTTP requests, acks) between slices, so a broadcast to a large room does not stall the node
   * for its whole duration. Default 16: measured with `npm run bench -- fanout`, small slices
   * gave the lowest end-to-end p99 at 1,000 clients while `POST /projects` was an interactive
   * transaction (about 1.9x raw at 8–16 against 2.4x–2.6x at 128 and 2.8x at 256); with its
   * one-statement write, 4, 16 and 128 measure alike.
   */
  sliceSize?: number
}

export interface WriteCoalescer {
  /** Writes every pending connection's frames now (all slices at once). */
  flush (): void
  /** Stops coalescing new connections' writes and flushes what is pending. */
  close (): void
  /** Slices written, connections written, frames sent through the coalescer, and of those the broadcast frames written directly, since the start (for tests and metrics). */
  readonly stats: { flushes: number, connections: number, frames: number, direct: number }
}

/**
 * Merges the WebSocket frames a connection is sent during one turn of the event loop into a
 * single socket write. A broadcast to N sockets costs N `writev` system calls, which dominate its
 * CPU; when several events reach the same sockets in one turn (a burst of commits, a reconnect
 * storm announcing presence), each socket now gets one write for all of them instead of one per
 * event. Nothing waits for a timer: the writes go out when the turn's I/O callbacks are done
 * (`setImmediate`), so a lone event is not delayed. A large room is written `sliceSize`
 * connections per turn, so database answers and requests are handled between slices instead of
 * waiting for the whole broadcast (connections still waiting keep collecting frames, in order).
 *
 * How: the connection's TCP socket is corked at its first frame of the turn and uncorked at the
 * end of it. engine.io lets one frame at a time into its transport (it waits for the write
 * callback), so while the frames only go to the corked buffer the transport stays writable; if
 * the kernel does not take everything at the uncork (slow client), engine.io waits for the write
 * callbacks again as usual, so a slow client still gets engine.io's back-pressure.
 *
 * Broadcasts take a shorter road: Socket.IO already encodes a broadcast's WebSocket frame once
 * for all its sockets (`wsPreEncodedFrame`), yet hands it to each socket through engine.io's
 * packet queue, five event emissions and ws's sender, about half of a broadcast's CPU. A
 * connection with nothing queued in engine.io and nothing unsent in user space gets the frame
 * (header and payload in one buffer, built once per broadcast) written straight into its corked
 * TCP socket, so it keeps its order with everything else the connection is sent. Any other
 * connection (a slow one, one in an upgrade, one with permessage-deflate or binary attachments)
 * takes engine.io's road. What such frames skip: engine.io's `packetCreate`, `flush` and `drain`
 * events, which Socket.IO does not use.
 */
export function coalesceWrites (io: Server, options: CoalesceOptions = {}): WriteCoalescer {
  const sliceSize = options.sliceSize ?? 16
  // Insertion order is flush order: a connection corked earlier is written earlier, and one
  // still waiting for its slice keeps collecting frames (its order is kept).
  const corked = new Map<WebSocketTransport, NetSocket>()
  // Connections that went through engine.io this turn: only those have a write callback in
  // their buffer that will make the transport writable again.
  const viaEngine = new Set<WebSocketTransport>()
  let scheduled: NodeJS.Immediate | undefined
  let closed = false
  const stats = { flushes: 0, connections: 0, frames: 0, direct: 0 }

  const writeSlice = (limit: number) => {
    scheduled = undefined
    let written = 0
    for (const [transport, raw] of corked) {
      if (written === limit) break
      written++
      corked.delete(transport)
      raw.uncork()
      // What the kernel did not take waits in userland: engine.io must hold further packets
      // until the write callbacks say it went out (its own back-pressure).
      if (viaEngine.delete(transport) && raw.writableLength > 0) transport.writable = false
    }
    stats.flushes++
    stats.connections += written
    // The rest goes after the I/O callbacks of the next turn.
    if (corked.size > 0) scheduled = setImmediate(writeSlice, sliceSize)
  }

  const flush = () => {
    if (scheduled) clearImmediate(scheduled)
    if (corked.size > 0) writeSlice(Infinity)
    scheduled = undefined
  }

  const cork = (transport: WebSocketTransport, raw: NetSocket) => {
    raw.cork()
    corked.set(transport, raw)
    scheduled ??= setImmediate(writeSlice, sliceSize)
  }

  // A broadcast's frame, header and payload in one buffer, built once for all its sockets.
  let lastFrame: Buffer[] | undefined
  let lastBuffer: Buffer | undefined
  const frameBuffer = (frame: Buffer[]) => {
    if (frame !== lastFrame) {
      lastFrame = frame
      lastBuffer = Buffer.concat(frame)
    }
    return lastBuffer!
  }

  // Socket.IO's Client#writeToEngine for every client (the client is `this`).
  function writeToEngine (this: SocketIoClient, encodedPackets: unknown, opts: { wsPreEncodedFrame?: Buffer[] }): void {
    const frame = opts.wsPreEncodedFrame
    const conn = this.conn
    const transport = conn.transport
    // transport.send is ours only on a WebSocket without extensions; writable and an empty
    // writeBuffer mean engine.io has nothing waiting that this frame could overtake.
    if (frame !== undefined && !closed && transport.send === coalescedSend && transport.writable && conn.readyState === 'open' && conn.writeBuffer.length === 0) {
      const raw = transport.socket!._socket!
      const isCorked = corked.has(transport)
      // Not corked yet this turn: only if everything sent before has reached the kernel, so a
      // slow client goes back to engine.io's back-pressure.
      if (raw.writable && (isCorked || raw.writableLength === 0)) {
        if (!isCorked) cork(transport, raw)
        raw.write(frameBuffer(frame))
        stats.frames++
        stats.direct++
        return
      }
    }
    (Object.getPrototypeOf(this) as SocketIoClient).writeToEngine.call(this, encodedPackets, opts)
  }

  // One function for every transport (the transport is `this`): no closure per connection.
  function coalescedSend (this: WebSocketTransport, packets: unknown[]): void {
    const send = (Object.getPrototypeOf(this) as WebSocketTransport).send
    const raw = this.socket?._socket
    if (closed || !raw || raw.destroyed) {
      send.call(this, packets)
      return
    }
    if (!corked.has(this)) cork(this, raw)
    viaEngine.add(this)
    stats.frames += packets.length
    send.call(this, packets)
    // The frames are in the corked buffer, not on the wire: accept more this turn.
    this.writable = true
  }

  const patch = (transport: WebSocketTransport) => {
    const raw = transport.socket?._socket
    if (transport.name !== 'websocket' || typeof raw?.cork !== 'function' || Object.hasOwn(transport, 'send')) return
    // With permessage-deflate, ws compresses asynchronously and engine.io's write callbacks are
    // the only back-pressure: such connections are left as they are.
    if (transport.socket?.extensions) return
    transport.send = coalescedSend
  }

  function onUpgrade (this: EngineSocket) {
    patch(this.transport)
  }
  const onConnection = (socket: EngineSocket) => {
    patch(socket.transport)
    socket.on('upgrade', onUpgrade)
  }
  io.engine.on('connection', onConnection)
  // A Socket.IO client is created after engine.io's connection event: patched at its first
  // namespace connection (clients of other namespaces only keep engine.io's road).
  const onSocket = (socket: { client: unknown }) => {
    const client = socket.client as SocketIoClient
    if (!Object.hasOwn(client, 'writeToEngine')) client.writeToEngine = writeToEngine
  }
  io.on('connection', onSocket)

  return {
    flush,
    close () {
      closed = true
      lastFrame = lastBuffer = undefined
      io.engine.off('connection', onConnection)
      io.off('connection', onSocket)
      flush()
    },
    stats
  }
}
