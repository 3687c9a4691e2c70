-- erp_require_member and erp_claim_commit name their tables unqualified, so they resolved them
-- through the caller's search_path: a schema ahead of public on it (one named like the role,
-- or an ALTER DATABASE ... SET search_path) decided which memberships the guard read. Pinned to
-- public, where the migrations create the tables, with pg_temp last so a temporary table cannot
-- stand in for one of them. The app calls them schema-qualified.
ALTER FUNCTION "public"."erp_require_member"(TEXT, TEXT, TEXT[]) SET search_path = public, pg_temp;
ALTER FUNCTION "public"."erp_claim_commit"(TEXT, TEXT, TEXT, TEXT) SET search_path = public, pg_temp;
