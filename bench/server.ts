/**
 * Our server, as a bench child process: the real app (buildApp, every plugin, domain routes)
 * on an existing bench database, logging off, listening on 127.0.0.1 port 0.
 */
import { randomBytes } from 'node:crypto'
import type { FastifyInstance } from 'fastify'
import { buildApp, type BuildOptions } from '../src/app.ts'
import { loadConfig, type AppConfig } from '../src/config.ts'
import { openDatabase, type Database } from '../src/db/index.ts'
import type { Role } from '../plugins/events.ts'
import { childArgs, serveParent, type Handlers } from './lib/child.ts'
import { scenarios } from './scenarios/index.ts'
import { cpu, memory } from './lib/memory.ts'
import { now } from './lib/clock.ts'
import { requestTimeOf } from './lib/envelope.ts'
import { stampArrivals } from './lib/trace.ts'

export interface ServerArgs {
  databaseUrl: string
  /** Config overrides (e.g. redisUrl for the cluster scenario). */
  config?: Partial<AppConfig>
  /** erp-realtime plugin options (JSON only). */
  realtime?: BuildOptions['realtime']
  poolSize?: number
}

export interface ServerState {
  app: FastifyInstance
  db: Database
}

const args = childArgs<ServerArgs>()
const db = await openDatabase({ url: args.databaseUrl, poolSize: args.poolSize })
const config: AppConfig = { ...loadConfig({ JWT_SECRET: randomBytes(32).toString('hex') }), port: 0, host: '127.0.0.1', databaseUrl: args.databaseUrl, ...args.config }
const app = await buildApp({ config, db, logger: false, realtime: args.realtime })
// Bench-only: stamp the broadcast time on project:created (the baseline sends tEmit too), so
// fanout can show the delivery part (broadcast → receipt) apart from the route's database work.
// With --trace, also when the request reached the server (tRecv).
const arrivalOf = stampArrivals(app)
const adapter = app.io.of('/').adapter
const broadcast = adapter.broadcast.bind(adapter)
adapter.broadcast = (packet, opts) => {
  const [event, envelope] = (packet as { data?: unknown[] }).data ?? []
  if (event === 'project:created' && typeof envelope === 'object' && envelope !== null) {
    const stamped = envelope as { tEmit?: number, tRecv?: number, data?: { project?: { name?: string } } }
    stamped.tEmit = now()
    const tRecv = arrivalOf(requestTimeOf(stamped.data?.project?.name))
    if (tRecv !== undefined) stamped.tRecv = tRecv
  }
  broadcast(packet, opts)
}
await app.listen({ port: 0, host: '127.0.0.1' })
const address = app.server.address()
const port = typeof address === 'object' && address ? address.port : 0
const state: ServerState = { app, db }

type Company = { companyId: string, users: Array<{ id: string, role: Role }> }
const signCompany = ({ companyId, users }: Company) => users.map(u => app.erpAuth.sign({ sub: u.id, companyId, role: u.role }))

let closing = false
const handlers: Handlers = {
  tokens: signCompany,
  /** Tokens of many companies in one call (10,000 companies of one user would be 10,000 calls). */
  tokensMany: (companies: Company[]) => companies.map(signCompany),
  memory,
  cpu,
  stats () {
    return { sockets: app.io.of('/').sockets.size, engine: app.io.engine.clientsCount }
  },
  async close () {
    if (closing) return
    closing = true
    await app.close()
    await db.close()
    setTimeout(() => process.exit(0), 10)
  }
}

// Scenario-specific server commands (each scenario module may add its own).
for (const scenario of Object.values(scenarios)) {
  for (const [cmd, fn] of Object.entries(scenario.serverCommands ?? {})) {
    handlers[`${scenario.name}:${cmd}`] = (a: unknown) => fn(a, state)
  }
}

serveParent(handlers, { port, pid: process.pid, nodeId: app.erpSocket.nodeId })
