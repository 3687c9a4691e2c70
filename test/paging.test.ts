import t from 'tap'
import { authHeader, build, createCompany } from './helpers.ts'

t.test('regression: paging projects and expenses whose createdAt ties skipped some rows and repeated others', async t => {
  const { app } = await build(t)
  const company = await createCompany(app, ['manager'])
  const manager = company.as('manager')
  const h = authHeader(manager)
  const at = new Date('2026-01-01T00:00:00.000Z')
  // Rows sharing a timestamp, as a burst of requests or an outbox flush makes them.
  await app.prisma.project.createMany({ data: Array.from({ length: 300 }, (_, i) => ({ companyId: company.id, name: `p${i}`, createdAt: at })) })
  await app.prisma.expense.createMany({
    data: Array.from({ length: 300 }, (_, i) => ({ companyId: company.id, submitterId: manager.id, amountMinor: i + 1, currency: 'EUR', description: `e${i}`, createdAt: at }))
  })
  for (const [url, key] of [['/projects', 'projects'], ['/expenses', 'expenses']] as const) {
    const seen: string[] = []
    for (let offset = 0; offset < 300; offset += 37) {
      const page = (await app.inject({ method: 'GET', url: `${url}?limit=37&offset=${offset}`, headers: h })).json()[key] as Array<{ id: string }>
      seen.push(...page.map(row => row.id))
    }
    t.equal(seen.length, 300, url)
    t.equal(new Set(seen).size, 300, `${url}: every row once across the pages`)
  }
})
