/**
 * Wall-clock milliseconds with sub-millisecond resolution. Every bench process on one host
 * uses this, so a timestamp taken in one process can be subtracted from one taken in another
 * (timeOrigin is the wall clock at process start; performance.now() is monotonic after it).
 */
export const now = (): number => performance.timeOrigin + performance.now()

export const sleep = (ms: number) => new Promise<void>(resolve => setTimeout(resolve, ms))

/** Polls `check` every `intervalMs` until it returns true; false when `deadline` (a now() value) passes. */
export async function until (check: () => boolean | Promise<boolean>, deadline: number, intervalMs = 50): Promise<boolean> {
  while (!(await check())) {
    if (now() > deadline) return false
    await sleep(intervalMs)
  }
  return true
}
