import { now, sleep } from './clock.ts'
import { Histogram } from './stats.ts'

export interface OpenLoop {
  /** When the first send was scheduled (clock.ts time). */
  start: number
  interval: number
  /** Request start → response, ms. */
  http: Histogram
  httpErrors: number
}

/**
 * Sends `count` requests at `rate`/s on schedule (open loop: not after the previous answer),
 * and waits for all answers. `send` gets the request's start time.
 */
export async function openLoop (count: number, rate: number, send: (t0: number) => Promise<void>): Promise<OpenLoop> {
  const interval = 1000 / rate
  const sends: Array<Promise<void>> = []
  const http = new Histogram()
  let httpErrors = 0
  const start = now() + 5
  for (let i = 0; i < count; i++) {
    const wait = start + i * interval - now()
    if (wait > 0) await sleep(wait)
    const t0 = now()
    sends.push(send(t0).then(() => http.record(now() - t0), () => { httpErrors++ }))
  }
  await Promise.all(sends)
  return { start, interval, http, httpErrors }
}

/** POST /projects on our server (a real domain route: database write + event record). */
export async function postProject (url: string, token: string, t0: number): Promise<void> {
  const res = await fetch(`${url}/projects`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
    body: JSON.stringify({ name: `bench ${t0}` })
  })
  await res.arrayBuffer()
  if (res.status !== 201) throw new Error(`HTTP ${res.status}`)
}
