import type { Socket } from 'socket.io'
import type { ZodType } from 'zod'
import { DATABASE_UNREACHABLE, zodIssues } from '../errors.ts'
import type { AckResult, ClientToServerEvents, InterServerEvents, ServerToClientEvents, SocketData } from '../events.ts'
import { databaseUnreachable } from '../support.ts'

export type ErpSocket = Socket<ClientToServerEvents, ServerToClientEvents, InterServerEvents, SocketData>

/** An error whose code and message reach the client in `{ ok: false, error }`. */
export class SocketError extends Error {
  constructor (public readonly code: string, message: string) {
    super(message)
    this.name = 'SocketError'
  }
}

type AckPayload<E extends keyof ClientToServerEvents> =
  Parameters<ClientToServerEvents[E]> extends [...unknown[], (result: AckResult<infer R>) => void] ? R : never

/**
 * A validated event listener, created once and shared by every socket (`socket.on(event,
 * listener)` on connection): the socket is `this`, so a connection costs no closure per event.
 * The payload is parsed with `schema` (events that take only an ack pass `null`), the handler's
 * result is acked as `{ ok: true, ...result }`, and any failure as `{ ok: false, error: { code,
 * message } }` (`SERVICE_UNAVAILABLE` when the database cannot be reached, else `INTERNAL` for an
 * error that is not a `SocketError`). Bad input never throws out of the listener and never
 * reaches the handler.
 */
export function listener<E extends keyof ClientToServerEvents, P> (
  event: E,
  schema: ZodType<P> | null,
  handler: (socket: ErpSocket, payload: P) => Promise<AckPayload<E>> | AckPayload<E>,
  onUnexpected: (err: unknown) => void = () => {}
): ClientToServerEvents[E] {
  async function validated (this: ErpSocket, ...args: unknown[]): Promise<void> {
    const last = args[args.length - 1]
    const ack = typeof last === 'function' ? (last as (result: unknown) => void) : undefined
    const reply = (result: unknown) => { if (ack) ack(result) }
    try {
      let payload = undefined as P
      if (schema) {
        const parsed = schema.safeParse(args.length > (ack ? 1 : 0) ? args[0] : undefined)
        if (!parsed.success) {
          const issue = zodIssues(parsed.error)[0]
          throw new SocketError('VALIDATION_FAILED', `Invalid ${event} payload: ${issue ? `${issue.path || 'payload'}: ${issue.message}` : 'malformed'}`)
        }
        payload = parsed.data
      }
      const result = await handler(this, payload)
      reply({ ok: true, ...(result as object) })
    } catch (err) {
      if (err instanceof SocketError) {
        reply({ ok: false, error: { code: err.code, message: err.message } })
      } else {
        onUnexpected(err)
        // A lost or refused database connection is an outage to retry, as over HTTP.
        reply(databaseUnreachable(err)
          ? { ok: false, error: { code: 'SERVICE_UNAVAILABLE', message: DATABASE_UNREACHABLE } }
          : { ok: false, error: { code: 'INTERNAL', message: 'Internal server error' } })
      }
    }
  }
  return validated as unknown as ClientToServerEvents[E]
}
