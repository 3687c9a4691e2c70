import { defineConfig } from 'prisma/config'

// Migrations are applied by src/db/migrate.ts (compatible with `prisma migrate deploy`);
// the CLI is used here only for `prisma generate`.
export default defineConfig({
  schema: 'prisma/schema.prisma',
  migrations: { path: 'prisma/migrations' }
})
