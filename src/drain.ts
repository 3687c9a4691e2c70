import type { FastifyInstance } from 'fastify'

/** How often, while the app closes, connections that have gone idle are closed (ms). */
const SWEEP_MS = 50

/**
 * Graceful HTTP shutdown. Requests in flight when the app starts closing run to the end and
 * get their response, with `Connection: close`. Keep-alive connections are closed as soon as
 * they are idle. Whatever is still open `timeoutMs` after closing began is destroyed.
 *
 * Why not Fastify's option alone:
 * - `forceCloseConnections: true` destroys requests in flight. The client sees a reset while
 *   its change may still commit, and the Idempotency-Key record may never get its response.
 * - `'idle'` closes only the connections idle when closing starts. `close()` then waits out
 *   `keepAliveTimeout` (72 s) for a connection that goes idle later (fastify/fastify#7044).
 *
 * Sockets upgraded to WebSocket are not HTTP connections here: erp-socket closes them in its
 * own `preClose`.
 */
export function drainOnClose (app: FastifyInstance, timeoutMs: number): void {
  if (!Number.isInteger(timeoutMs) || timeoutMs < 0) throw new TypeError(`drainTimeoutMs must be a whole number of milliseconds, not ${timeoutMs}`)
  let closing = false
  let sweep: NodeJS.Timeout | undefined
  let deadline: NodeJS.Timeout | undefined

  app.addHook('onSend', (_request, reply, payload, done) => {
    if (closing) reply.header('connection', 'close')
    done(null, payload)
  })

  app.addHook('preClose', (done) => {
    closing = true
    const server = app.server
    if (server.listening) {
      sweep = setInterval(() => server.closeIdleConnections(), SWEEP_MS).unref()
      deadline = setTimeout(() => server.closeAllConnections(), timeoutMs).unref()
    }
    done()
  })

  // Fastify closes the HTTP server before the other onClose hooks run, so the drain is over.
  app.addHook('onClose', (_instance, done) => {
    clearInterval(sweep)
    clearTimeout(deadline)
    done()
  })
}
