import { defineConfig } from 'prisma/config'

// Migrations are applied by src/db/migrate.ts (compatible with `prisma migrate deploy`);
// the CLI is used here only for `prisma generate`. The demo seed is prisma/seed.ts, run by
// `npm run db:seed` (also `prisma db seed`).
export default defineConfig({
  schema: 'prisma/schema.prisma',
  migrations: { path: 'prisma/migrations', seed: 'tsx src/cli/seed.ts' }
})
