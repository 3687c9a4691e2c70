import { companyStream } from '../../plugins/events.ts'
import { now } from '../lib/clock.ts'
import { medians, type Row, type Scenario } from '../lib/scenario.ts'
import { median, round } from '../lib/stats.ts'

/**
 * conflicts (issue 6): same-version update races. Projects are raced in batches: `racers`
 * updates of one project start at once, all with baseVersion 1, each changing one field
 * (name / description / budgetMinor), `parallel` projects at a time, `updates` in total.
 *
 * ours: fastify.conflicts.update (advisory lock per row, version-conditional write, three-way
 * merge, project:updated event in the same transaction) with the `last-write-wins` strategy,
 * so every racer applies and must be accounted for by its own version and event.
 * baseline: the seeds' whole-row last-write-wins — read the row, write it back unconditionally
 * with version = read + 1, same event — which loses updates under concurrency.
 *
 * lost updates = answered-as-applied updates - versions the row actually advanced (or events
 * recorded, whichever is fewer). Both run in the server process (no HTTP), so the figures
 * compare the update paths, not routing.
 */

const FIELDS = ['name', 'description', 'budgetMinor'] as const
const valueOf = (field: typeof FIELDS[number], tag: string, i: number) => (field === 'budgetMinor' ? i + 1 : `${tag} ${i}`)

interface RaceResult {
  updates: number
  applied: number
  rejected: number
  errors: number
  lost: number
  missingEvents: number
  duplicateVersions: number
  ms: number
  updatesPerSecond: number
}

export const conflicts: Scenario = {
  name: 'conflicts',
  description: '10,000 same-version update races in batches: lost updates (must be 0) and versioned updates/s',
  default: true,
  flags: '--updates 10000 --racers 50 --parallel 8 --conflict-reps 1',

  serverCommands: {
    /** Creates `count` projects (version 1, with their base revision). */
    async setup ({ companyId, count, tag }: { companyId: string, count: number, tag: string }, { app }) {
      const ids: string[] = []
      for (let i = 0; i < count; i += 100) {
        await app.eventLog.transaction(async (tx) => {
          for (let j = i; j < Math.min(count, i + 100); j++) {
            const project = await tx.project.create({ data: { companyId, name: `${tag} race ${j}` } })
            await app.conflicts.snapshot(tx, 'project', project)
            ids.push(project.id)
          }
        })
      }
      return ids
    },

    async race ({ companyId, actorId, projectIds, racers, parallel, mode }: { companyId: string, actorId: string, projectIds: string[], racers: number, parallel: number, mode: 'ours' | 'naive' }, { app }): Promise<RaceResult> {
      const stream = companyStream(companyId)
      const oursUpdate = (id: string, field: typeof FIELDS[number], value: unknown) => app.conflicts.update({
        entity: 'project',
        id,
        companyId,
        userId: actorId,
        baseVersion: 1,
        changes: { [field]: value },
        read: (tx) => tx.project.findFirst({ where: { id, companyId } }),
        write: (tx, data, version) => tx.project.updateMany({ where: { id, companyId, version }, data: { ...data, version: { increment: 1 } } }),
        applied: async (_tx, publish, project, { changed, merged }) => {
          await publish({ stream, type: 'project:updated', companyId, actorId, data: { project, changed, merged } })
        },
        respond: (project) => project.version
      })
      const naiveUpdate = (id: string, field: typeof FIELDS[number], value: unknown) => app.eventLog.transaction(async (tx, publish) => {
        const row = await tx.project.findFirstOrThrow({ where: { id, companyId } })
        const project = await tx.project.update({ where: { id }, data: { ...row, [field]: value, version: row.version + 1, updatedAt: undefined } })
        await publish({ stream, type: 'project:updated', companyId, actorId, data: { project, changed: [field] } })
        return project.version
      })
      const update = mode === 'ours' ? oursUpdate : naiveUpdate

      const results: Array<{ id: string, version?: number, rejected?: boolean, error?: boolean }> = []
      const started = now()
      let next = 0
      const lane = async () => {
        while (next < projectIds.length) {
          const id = projectIds[next++]!
          await Promise.all(Array.from({ length: racers }, (_, i) => {
            const field = FIELDS[i % FIELDS.length]!
            return update(id, field, valueOf(field, mode, i)).then(
              version => { results.push({ id, version }) },
              (err: { statusCode?: number }) => { results.push(err.statusCode === 409 ? { id, rejected: true } : { id, error: true }) }
            )
          }))
        }
      }
      await Promise.all(Array.from({ length: parallel }, lane))
      const ms = now() - started

      const rows = await app.prisma.project.findMany({ where: { id: { in: projectIds } }, select: { id: true, version: true } })
      const finalVersion = new Map(rows.map(r => [r.id, r.version]))
      const events = await app.prisma.$queryRaw<Array<{ id: string, n: number }>>`
        SELECT data->'project'->>'id' AS id, count(*)::int AS n FROM events
        WHERE type = 'project:updated' AND data->'project'->>'id' = ANY(${projectIds}::text[])
        GROUP BY 1`
      const eventCount = new Map(events.map(e => [e.id, Number(e.n)]))
      let lost = 0
      let missingEvents = 0
      let duplicateVersions = 0
      for (const id of projectIds) {
        const applied = results.filter(r => r.id === id && r.version !== undefined)
        const advanced = (finalVersion.get(id) ?? 1) - 1
        const recorded = eventCount.get(id) ?? 0
        lost += Math.max(0, applied.length - Math.min(advanced, recorded))
        missingEvents += Math.max(0, applied.length - recorded)
        duplicateVersions += applied.length - new Set(applied.map(r => r.version)).size
      }
      const applied = results.filter(r => r.version !== undefined).length
      return {
        updates: results.length,
        applied,
        rejected: results.filter(r => r.rejected).length,
        errors: results.filter(r => r.error).length,
        lost,
        missingEvents,
        duplicateVersions,
        ms,
        updatesPerSecond: applied / (ms / 1000)
      }
    }
  },

  async run (ctx) {
    const updates = ctx.number('updates', ctx.quick ? 2000 : 10_000)
    const racers = ctx.number('racers', 50)
    const parallel = ctx.number('parallel', 8)
    const projects = Math.ceil(updates / racers)
    // One repetition by default: 10,000 races per mode already take a minute or two on 2 cores.
    const repCount = ctx.number('conflict-reps', 1)
    const parameters = { updates, racers, parallel, projectsPerRep: projects, strategy: 'last-write-wins', reps: repCount, poolSize: 10 }

    const db = await ctx.database()
    const company = await ctx.seed(db, 1)
    const server = await ctx.startServer(db, { realtime: { conflicts: { strategies: { project: 'last-write-wins' } } } })
    const args = { companyId: company.companyId, actorId: company.users[0]!.id, racers, parallel }

    const reps: Record<'ours' | 'naive', RaceResult[]> = { ours: [], naive: [] }
    for (let rep = 0; rep < repCount; rep++) {
      for (const mode of rep % 2 ? ['naive', 'ours'] as const : ['ours', 'naive'] as const) {
        const projectIds = await server.call<string[]>('conflicts:setup', { companyId: company.companyId, count: projects, tag: `${mode}${rep}` }, 120_000)
        const result = await server.call<RaceResult>('conflicts:race', { ...args, projectIds, mode }, 600_000)
        if (result.errors > 0) throw new Error(`${mode}: ${result.errors} updates failed`)
        if (mode === 'ours' && (result.lost > 0 || result.duplicateVersions > 0 || result.missingEvents > 0)) {
          throw new Error(`ours lost updates: ${JSON.stringify(result)}`)
        }
        reps[mode].push(result)
        ctx.log(`rep ${rep + 1} ${mode}: ${result.applied}/${result.updates} applied, ${result.rejected} rejected, ${result.lost} lost, ${round(result.updatesPerSecond, 0)} updates/s`)
      }
    }

    const label = `conflicts ${updates}`
    const rows: Row[] = [{
      label, metric: 'lost updates', unit: 'updates', better: 'lower', summary: true, baselineName: 'unversioned LWW',
      target: { maxOurs: 1 },
      ...medians(reps.ours.map(r => r.lost), reps.naive.map(r => r.lost))
    }, {
      label, metric: 'versioned updates/s', unit: '/s', better: 'higher', summary: true, baselineName: 'unversioned LWW',
      ...medians(reps.ours.map(r => r.updatesPerSecond), reps.naive.map(r => r.updatesPerSecond))
    }]
    return {
      parameters,
      rows,
      raw: reps,
      notes: [`${racers} racers per project on baseVersion 1, ${parallel} projects at a time; in-process (no HTTP). The baseline writes every update but keeps only ${round(median(reps.naive.map(r => (r.updates - r.lost) / r.updates * 100)), 1)} % of them.`]
    }
  }
}
