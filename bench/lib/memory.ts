/** Process memory after a full GC (children run with --expose-gc). */
export function memory () {
  // Two passes: the first can leave finalizers that free more on the second.
  const gc = (globalThis as { gc?: () => void }).gc
  gc?.()
  gc?.()
  const m = process.memoryUsage()
  return { rss: m.rss, heapUsed: m.heapUsed, heapTotal: m.heapTotal, external: m.external, arrayBuffers: m.arrayBuffers, gc: Boolean(gc) }
}

export type Memory = ReturnType<typeof memory>

/** CPU time this process has used so far (user + system), ms. */
export function cpu () {
  const { user, system } = process.cpuUsage()
  return (user + system) / 1000
}
