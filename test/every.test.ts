import Fastify from 'fastify'
import t from 'tap'
import { every, EVERY_CLOSE_WAIT_MS } from '../plugins/support.ts'
import { sleep, waitFor } from './helpers.ts'

t.test('regression: close did not wait for a periodic job under way, which then ran against a closed database', async t => {
  const app = Fastify()
  let started = 0
  let finish!: () => void
  const finished = new Promise<void>(resolve => { finish = resolve })
  every(app, 10, 'test job', async () => {
    started++
    await finished
  })
  await app.ready()
  await waitFor(() => started === 1, 2000, 'the job to start')
  let closed = false
  const closing = app.close().then(() => { closed = true })
  await sleep(50)
  t.notOk(closed, 'close waits for the run under way')
  finish()
  await closing
  t.equal(started, 1, 'no run starts once closing began (runs never overlap either)')
})

t.test('a failing job is logged and the timer goes on; 0 disables it', async t => {
  const warnings: string[] = []
  const app = Fastify({ logger: { level: 'warn', stream: { write: (line: string) => { warnings.push(JSON.parse(line).msg) } } } })
  t.teardown(() => app.close())
  let runs = 0
  every(app, 10, 'flaky job', async () => {
    runs++
    throw new Error('boom')
  })
  let disabledRuns = 0
  every(app, 0, 'disabled job', async () => { disabledRuns++ })
  await app.ready()
  await waitFor(() => runs >= 2, 2000, 'two runs')
  t.ok(warnings.includes('flaky job failed'))
  t.equal(disabledRuns, 0)
})

t.test('close waits for a job under way at most EVERY_CLOSE_WAIT_MS (a database that stopped answering must not hold it)', async t => {
  const app = Fastify()
  let started = false
  every(app, 10, 'stuck job', async () => {
    started = true
    await new Promise(() => {})
  })
  await app.ready()
  await waitFor(() => started, 2000, 'the job to start')
  const closing = Date.now()
  await app.close()
  const took = Date.now() - closing
  t.ok(took >= EVERY_CLOSE_WAIT_MS - 50 && took < EVERY_CLOSE_WAIT_MS + 1000, `close resolved after ${took} ms`)
})
