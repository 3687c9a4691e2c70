import t from 'tap'
import { seedIfEmpty, DEMO_PASSWORD, DEMO_USERS } from '../src/db/seed.ts'
import { build } from './helpers.ts'

t.test('the demo seed runs once and its users can log in', async t => {
  const { app, prisma } = await build(t)
  t.equal(await seedIfEmpty(prisma), true)
  t.equal(await seedIfEmpty(prisma), false, 'a database with companies is left alone')
  t.equal(await prisma.company.count(), 2)
  t.equal(await prisma.user.count(), DEMO_USERS.length)
  for (const user of DEMO_USERS) {
    const res = await app.inject({ method: 'POST', url: '/auth/login', payload: { email: user.email, password: DEMO_PASSWORD } })
    t.equal(res.statusCode, 200, user.email)
    t.match(res.json(), { role: user.role, company: { name: user.company } })
  }
  // Seeded rows carry their first revision, so stale edits of them can be merged.
  t.equal(await prisma.revision.count({ where: { entity: 'project', version: 1 } }), 3)
})
