/**
 * The frame the baseline (and our server's plain emit, `fanout --plain-emit`) sends: our
 * project:created envelope field for field (ids of the same length, the request time in the
 * project name as our route's clients send it), so every side sends and the clients parse the
 * same bytes: 614 characters.
 */
export const benchUuid = (n: number) => `00000000-0000-4000-8000-${String(n).padStart(12, '0')}`

export function benchEnvelope (t0: number, seq: number, companyId = benchUuid(2)) {
  const at = new Date().toISOString()
  return {
    id: benchUuid(1),
    stream: `company:${companyId}`,
    seq,
    type: 'project:created',
    companyId,
    at,
    actor: { userId: benchUuid(3) },
    data: { project: { id: benchUuid(4), companyId, name: benchName(t0), description: '', status: 'active', budgetMinor: 0, version: 1, createdAt: at, updatedAt: at } }
  }
}

/** The project name that carries a change's request time (`bench <t0>`), and back. */
export const benchName = (t0: number) => `bench ${t0}`
export const requestTimeOf = (name: unknown) => Number(String(name ?? '').split(' ')[1])
