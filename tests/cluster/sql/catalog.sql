-- Everything the memory_ext extension defines, one row per property, in a stable order: the
-- upgrade test compares it between an updated and a freshly installed database. Oids and
-- install-order-dependent values (attnum, oids in ACLs) are replaced by names.
WITH ext AS (
    SELECT e.oid, e.extversion, e.extconfig, e.extcondition FROM pg_extension e
     WHERE e.extname = 'memory_ext'
), member AS (
    SELECT d.classid, d.objid FROM pg_depend d, ext
     WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'
), rel AS (
    SELECT c.* FROM pg_class c JOIN member m ON m.classid = 'pg_class'::regclass AND m.objid = c.oid
), fn AS (
    SELECT p.* FROM pg_proc p JOIN member m ON m.classid = 'pg_proc'::regclass AND m.objid = p.oid
), acl(kind, name, acl) AS (
    -- privileges as sorted "grantee:privilege" lists, by name
    SELECT 'relation', c.oid::regclass::text, c.relacl FROM rel c
    UNION ALL SELECT 'function', p.oid::regprocedure::text, p.proacl FROM fn p
    UNION ALL SELECT 'schema', n.nspname, n.nspacl FROM pg_namespace n WHERE n.nspname = 'memory'
), initial(kind, name, acl) AS (
    SELECT 'relation', i.objoid::regclass::text, i.initprivs FROM pg_init_privs i
      JOIN member m ON m.classid = i.classoid AND m.objid = i.objoid
     WHERE i.classoid = 'pg_class'::regclass AND i.objsubid = 0
    UNION ALL SELECT 'function', i.objoid::regprocedure::text, i.initprivs FROM pg_init_privs i
      JOIN member m ON m.classid = i.classoid AND m.objid = i.objoid
     WHERE i.classoid = 'pg_proc'::regclass
    UNION ALL SELECT 'schema', n.nspname, i.initprivs FROM pg_init_privs i
      JOIN pg_namespace n ON i.classoid = 'pg_namespace'::regclass AND i.objoid = n.oid
     WHERE n.nspname = 'memory'
)
SELECT kind, name, detail FROM (
    SELECT 'member' AS kind, pg_describe_object(m.classid, m.objid, 0) AS name, '' AS detail
      FROM member m
    UNION ALL
    SELECT 'relation', c.oid::regclass::text,
           format('kind=%s persistence=%s rls=%s force_rls=%s owner=%s', c.relkind,
                  c.relpersistence, c.relrowsecurity, c.relforcerowsecurity, c.relowner::regrole)
      FROM rel c
    UNION ALL
    SELECT 'column', a.attrelid::regclass::text || '.' || a.attname,
           format('%s notnull=%s default=%s position=%s', format_type(a.atttypid, a.atttypmod),
                  a.attnotnull, pg_get_expr(ad.adbin, ad.adrelid),
                  (SELECT count(*) FROM pg_attribute b WHERE b.attrelid = a.attrelid
                      AND b.attnum > 0 AND NOT b.attisdropped AND b.attnum <= a.attnum))
      FROM pg_attribute a JOIN rel c ON c.oid = a.attrelid
      LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
     WHERE a.attnum > 0 AND NOT a.attisdropped
    UNION ALL
    SELECT 'constraint', co.conrelid::regclass::text || ' ' || co.conname,
           pg_get_constraintdef(co.oid)
      FROM pg_constraint co JOIN rel c ON c.oid = co.conrelid
    UNION ALL
    SELECT 'index', i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
      FROM pg_index i JOIN rel c ON c.oid = i.indrelid
    UNION ALL
    SELECT 'view', c.oid::regclass::text, pg_get_viewdef(c.oid)
      FROM rel c WHERE c.relkind = 'v'
    UNION ALL
    SELECT 'policy', pol.polrelid::regclass::text || ' ' || pol.polname,
           format('cmd=%s permissive=%s roles=%s using=%s check=%s', pol.polcmd, pol.polpermissive,
                  (SELECT string_agg(n, ',' ORDER BY n)
                     FROM (SELECT CASE r WHEN 0 THEN 'public' ELSE r::regrole::text END AS n
                             FROM unnest(pol.polroles) r) z),
                  pg_get_expr(pol.polqual, pol.polrelid), pg_get_expr(pol.polwithcheck, pol.polrelid))
      FROM pg_policy pol JOIN rel c ON c.oid = pol.polrelid
    UNION ALL
    SELECT 'trigger', t.tgrelid::regclass::text || ' ' || t.tgname,
           pg_get_triggerdef(t.oid) || ' enabled=' || t.tgenabled::text
      FROM pg_trigger t JOIN rel c ON c.oid = t.tgrelid WHERE NOT t.tgisinternal
    UNION ALL
    SELECT 'function', p.oid::regprocedure::text, pg_get_functiondef(p.oid)
      FROM fn p
    UNION ALL
    SELECT 'function properties', p.oid::regprocedure::text,
           format('volatile=%s strict=%s parallel=%s definer=%s leakproof=%s cost=%s rows=%s config=%s owner=%s',
                  p.provolatile, p.proisstrict, p.proparallel, p.prosecdef, p.proleakproof,
                  p.procost, p.prorows, p.proconfig, p.proowner::regrole)
      FROM fn p
    UNION ALL
    SELECT 'privileges ' || a.kind, a.name,
           coalesce((SELECT string_agg(e, ' ' ORDER BY e)
                       FROM (SELECT CASE x.grantee WHEN 0 THEN 'public' ELSE x.grantee::regrole::text END
                                    || ':' || x.privilege_type
                                    || CASE WHEN x.is_grantable THEN '*' ELSE '' END AS e
                               FROM aclexplode(a.acl) x) z), '(default)')
      FROM acl a
    UNION ALL
    SELECT 'initial privileges ' || i.kind, i.name,
           coalesce((SELECT string_agg(e, ' ' ORDER BY e)
                       FROM (SELECT CASE x.grantee WHEN 0 THEN 'public' ELSE x.grantee::regrole::text END
                                    || ':' || x.privilege_type AS e
                               FROM aclexplode(i.acl) x) z), '(none)')
      FROM initial i
    UNION ALL
    SELECT 'dumped table', c.oid::regclass::text,
           coalesce(ext.extcondition[array_position(ext.extconfig, c.oid)], '')
      FROM ext, rel c WHERE c.oid = ANY (ext.extconfig)
    UNION ALL
    SELECT 'extension', 'memory_ext', 'version ' || ext.extversion FROM ext
) catalog
ORDER BY kind, name, detail
