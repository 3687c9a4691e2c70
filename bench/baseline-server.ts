/**
 * The baseline: minimal Fastify + Socket.IO, no auth, no database. Clients join one room on
 * connect; POST /emit does a plain `io.to(room).emit`. The floor our server is compared with.
 */
import Fastify from 'fastify'
import { Server } from 'socket.io'
import { childArgs, serveParent, type Handlers } from './lib/child.ts'
import { now } from './lib/clock.ts'
import { benchEnvelope } from './lib/envelope.ts'
import { stampArrivals } from './lib/trace.ts'
import { scenarios } from './scenarios/index.ts'
import { cpu, memory } from './lib/memory.ts'

export interface BaselineState {
  io: Server
  room: string
  /** Per-scenario scratch space (e.g. the in-memory "log" of the replay baseline). */
  store: Map<string, unknown>
}

childArgs<Record<string, never>>()
const app = Fastify({ logger: false, forceCloseConnections: true })
const io = new Server(app.server)
const room = 'company:bench'
const state: BaselineState = { io, room, store: new Map() }

io.on('connection', (socket) => {
  socket.join(room)
  for (const scenario of Object.values(scenarios)) scenario.baselineConnection?.(socket, state)
})

let seq = 0

const arrivalOf = stampArrivals(app)
app.post('/emit', async (request) => {
  const { t0 } = request.body as { t0: number }
  const tRecv = arrivalOf(t0)
  io.to(room).emit('bench', { ...benchEnvelope(t0, ++seq), tEmit: now(), ...(tRecv === undefined ? {} : { tRecv }) })
  return { ok: true }
})

app.addHook('preClose', (done) => { io.local.disconnectSockets(true); done() })
app.addHook('onClose', async () => { await io.close() })
await app.listen({ port: 0, host: '127.0.0.1' })
const address = app.server.address()
const port = typeof address === 'object' && address ? address.port : 0

const handlers: Handlers = {
  memory,
  cpu,
  stats () {
    return { sockets: io.of('/').sockets.size, engine: io.engine.clientsCount }
  },
  async close () {
    await app.close()
    setTimeout(() => process.exit(0), 10)
  }
}
for (const scenario of Object.values(scenarios)) {
  for (const [cmd, fn] of Object.entries(scenario.baselineCommands ?? {})) {
    handlers[`${scenario.name}:${cmd}`] = (a: unknown) => fn(a, state)
  }
}

serveParent(handlers, { port, pid: process.pid })
