import { randomUUID } from 'node:crypto'
import type { FastifyInstance } from 'fastify'
import { Prisma, type Project } from '../generated/prisma/client.ts'
import { z } from 'zod'
import { Errors } from '../../plugins/errors.ts'
import { companyStream, storable } from '../../plugins/events.ts'
import { baseVersionOf, idParams, listQuery, parse, text } from './common.ts'

/** Detached expenses listed in a `project:deleted` event; the count says when there were more. */
const DETACHED_LISTED = 1000

const projectFields = {
  name: text(200),
  description: storable(z.string().max(5000)),
  status: z.enum(['active', 'on_hold', 'completed', 'archived']),
  budgetMinor: z.number().int().min(0).max(2_000_000_000)
}
const createBody = z.object({
  name: projectFields.name,
  description: projectFields.description.default(''),
  status: projectFields.status.default('active'),
  budgetMinor: projectFields.budgetMinor.default(0)
}).strict()
// What an update may change: also what a custom conflict resolver may write.
const updatableFields = z.object({
  name: projectFields.name.optional(),
  description: projectFields.description.optional(),
  status: projectFields.status.optional(),
  budgetMinor: projectFields.budgetMinor.optional()
}).strict()
const updateBody = updatableFields.extend({
  baseVersion: z.number().int().min(1).optional()
}).strict().refine(body => Object.keys(body).some(key => key !== 'baseVersion'), 'name at least one field to change')

export async function projectRoutes (fastify: FastifyInstance) {
  fastify.addHook('preHandler', fastify.authenticate)

  fastify.get('/projects', async (request) => {
    const { limit, offset } = parse(listQuery, request.query)
    return { projects: await fastify.prisma.project.findMany({ where: { companyId: request.user.companyId }, orderBy: [{ createdAt: 'asc' }, { id: 'asc' }], take: limit, skip: offset }) }
  })

  // The membership check runs inside the write's statement (`guard`), not as a query before it.
  fastify.post('/projects', { config: { erpAuth: { membership: 'in-write' } } }, async (request, reply) => {
    const body = parse(createBody, request.body)
    const { companyId, userId } = request.user
    // A create reads nothing, so the row, its revision and its event go in one statement (one
    // round trip instead of an interactive transaction's five), with the membership check.
    // Field order as Prisma reads the row, so responses and events look alike everywhere.
    const now = new Date()
    const project: Project = { id: randomUUID(), companyId, ...body, version: 1, createdAt: now, updatedAt: now }
    await fastify.eventLog.commit({
      writes: [
        Prisma.sql`
          INSERT INTO projects (id, "companyId", name, description, status, "budgetMinor", version, "createdAt", "updatedAt")
          VALUES (${project.id}, ${companyId}, ${project.name}, ${project.description}, ${project.status}, ${project.budgetMinor}, 1, ${now}, ${now})`,
        fastify.conflicts.snapshotStatement('project', project)
      ],
      event: { stream: companyStream(companyId), type: 'project:created', companyId, actorId: userId, data: { project } },
      guard: fastify.erpAuth.writeGuard(request)
    })
    reply.code(201)
    return { project }
  })

  fastify.get('/projects/:id', async (request) => {
    const { id } = parse(idParams, request.params)
    const project = await fastify.prisma.project.findFirst({ where: { id, companyId: request.user.companyId } })
    if (!project) throw new Errors.NOT_FOUND('Project')
    return { project }
  })

  fastify.patch('/projects/:id', async (request) => {
    const { id } = parse(idParams, request.params)
    const { baseVersion: bodyVersion, ...changes } = parse(updateBody, request.body)
    const baseVersion = baseVersionOf(request, bodyVersion)
    const { companyId, userId } = request.user
    return await fastify.conflicts.update({
      entity: 'project',
      id,
      companyId,
      userId,
      baseVersion,
      changes,
      guard: fastify.erpAuth.writeGuard(request),
      read: (tx) => tx.project.findFirst({ where: { id, companyId } }),
      accept: (fields) => updatableFields.parse(fields),
      write: (tx, data, version) => tx.project.updateMany({ where: { id, companyId, version }, data: { ...data, version: { increment: 1 } } }),
      applied: async (_tx, publish, project, { changed, merged }) => {
        await publish({ stream: companyStream(companyId), type: 'project:updated', companyId, actorId: userId, data: { project, changed, merged } })
      },
      respond: (project, merged) => ({ project, merged })
    })
  })

  // The foreign key `expenses.projectId` is ON DELETE SET NULL: left to it, the delete would change
  // the project's expenses without a version bump or an event. So the transaction detaches them
  // first, as an update of each (version + 1, revision snapshot for later merges), and the one
  // `project:deleted` event lists them with their new versions. Its first statement locks the
  // project row: POST /expenses for it checks the project FOR KEY SHARE, so it waits and then
  // answers 404, and none is detached unannounced. The membership check (`in-write`) is also the
  // transaction's last statement, after every lock wait: made first only, it let a member
  // removed while the delete waited for the row delete the project.
  fastify.delete('/projects/:id', { config: { erpAuth: { membership: 'in-write' } } }, async (request, reply) => {
    const { id } = parse(idParams, request.params)
    const { companyId, userId } = request.user
    const guard = fastify.erpAuth.writeGuard(request)
    await fastify.eventLog.transaction(async (tx, publish) => {
      // Checked here too (same statement, no round trip more), so a caller who is no longer a
      // member is refused before the delete takes its locks.
      const [checked] = await tx.$queryRaw<Array<{ value: unknown, found: boolean }>>`
        SELECT ${guard.sql} AS value, EXISTS (SELECT 1 FROM projects WHERE id = ${id} AND "companyId" = ${companyId} FOR UPDATE) AS found`
        .catch((err: unknown) => { throw guard.error?.(err) ?? err })
      if (!checked!.found) throw new Errors.NOT_FOUND('Project')
      // UPDATE expenses SET "projectId" = NULL, version = version + 1, "updatedAt" = now ... RETURNING *
      const detached = await tx.expense.updateManyAndReturn({
        where: { projectId: id, companyId },
        data: { projectId: null, version: { increment: 1 } }
      })
      detached.sort((a, b) => a.createdAt.getTime() - b.createdAt.getTime() || (a.id < b.id ? -1 : 1))
      if (detached.length > 0) await fastify.conflicts.snapshot(tx, 'expense', detached)
      await tx.$executeRaw`DELETE FROM projects WHERE id = ${id} AND "companyId" = ${companyId}`
      await fastify.conflicts.forget(tx, 'project', id)
      await publish({
        stream: companyStream(companyId),
        type: 'project:deleted',
        companyId,
        actorId: userId,
        // Bounded: the event goes to every socket of the company and into every replay.
        data: {
          projectId: id,
          detachedExpenses: detached.slice(0, DETACHED_LISTED).map(expense => ({ id: expense.id, version: expense.version })),
          detachedExpenseCount: detached.length
        }
      })
    }, { guard })
    reply.code(204)
  })
}
