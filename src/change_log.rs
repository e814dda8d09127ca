//! Change tracking: the row trigger that `fraiseql_track_changes()` puts on
//! a table, writing each change to `tb_entity_change_log`.
//!
//! It is a C trigger in two halves, so that nobody's code runs with more
//! rights than its owner:
//! * the row is turned into JSON **as the role that changed it** (to_jsonb
//!   runs the casts to json of user-defined column types: a table owner's
//!   cast must never run as the extension's owner, a superuser);
//! * only the INSERT into the change log, which runs no user code, is done
//!   as the extension's owner, inside a security-restricted operation with
//!   search_path = pg_catalog, pg_temp.
//!
//! A trigger function cannot be called directly, so nobody can forge log
//! rows through it: it writes what the trigger manager hands it.
use pgrx::prelude::*;
use pgrx::{pg_sys, IntoDatum};
use std::ffi::{CStr, CString};

#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_fraiseql_track_changes_trigger_c() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

const TRIGGER_EVENT_INSERT: u32 = 0;
const TRIGGER_EVENT_DELETE: u32 = 1;
const TRIGGER_EVENT_UPDATE: u32 = 2;
const TRIGGER_EVENT_OPMASK: u32 = 3;
const TRIGGER_EVENT_ROW: u32 = 4;

#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn fraiseql_track_changes_trigger_c(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    unsafe {
        let ctx = (*fcinfo).context;
        if ctx.is_null() || !pgrx::is_a(ctx, pg_sys::NodeTag::T_TriggerData) {
            error!("fraiseql_obs: _fraiseql_track_changes_trigger() must be called as a trigger");
        }
        let td = ctx as *mut pg_sys::TriggerData;
        let event = (*td).tg_event;
        if event & TRIGGER_EVENT_ROW == 0 {
            error!("fraiseql_obs: _fraiseql_track_changes_trigger() is a row trigger");
        }
        let rel = (*td).tg_relation;
        let tupdesc = (*rel).rd_att;
        let rowtype = (*(*rel).rd_rel).reltype;
        let as_datum = |t: pg_sys::HeapTuple| {
            (!t.is_null()).then(|| pg_sys::heap_copy_tuple_as_datum(t, tupdesc))
        };
        let (op, before, after) = match event & TRIGGER_EVENT_OPMASK {
            TRIGGER_EVENT_INSERT => ("insert", None, as_datum((*td).tg_trigtuple)),
            TRIGGER_EVENT_DELETE => ("delete", as_datum((*td).tg_trigtuple), None),
            TRIGGER_EVENT_UPDATE => (
                "update",
                as_datum((*td).tg_trigtuple),
                as_datum((*td).tg_newtuple),
            ),
            _ => return pg_sys::Datum::from(0),
        };
        // TG_ARGV: the entity name, then the primary key columns
        let trigger = (*td).tg_trigger;
        let args: Vec<String> = (0..(*trigger).tgnargs as usize)
            .map(|i| {
                CStr::from_ptr(*(*trigger).tgargs.add(i))
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let Some((entity, keys)) = args.split_first() else {
            error!("fraiseql_obs: the change-tracking trigger needs an entity name argument");
        };
        let namespace = pg_sys::get_func_namespace((*(*fcinfo).flinfo).fn_oid);
        let schema = CStr::from_ptr(pg_sys::quote_identifier(pg_sys::get_namespace_name(
            namespace,
        )))
        .to_string_lossy()
        .into_owned();

        pg_sys::SPI_connect();
        // 1. as the role that changed the row
        let (before_json, after_json, owner) = {
            let sql = c"SELECT pg_catalog.to_jsonb($1), pg_catalog.to_jsonb($2), \
                        (SELECT e.extowner FROM pg_catalog.pg_extension e \
                          WHERE e.extname OPERATOR(pg_catalog.=) 'fraiseql_obs'::pg_catalog.name)";
            let mut types = [rowtype, rowtype];
            let mut values = [
                before.unwrap_or(pg_sys::Datum::from(0)),
                after.unwrap_or(pg_sys::Datum::from(0)),
            ];
            let nulls = [
                if before.is_some() { b' ' } else { b'n' } as std::ffi::c_char,
                if after.is_some() { b' ' } else { b'n' } as std::ffi::c_char,
            ];
            let rc = pg_sys::SPI_execute_with_args(
                sql.as_ptr(),
                2,
                types.as_mut_ptr(),
                values.as_mut_ptr(),
                nulls.as_ptr(),
                true,
                1,
            );
            if rc != pg_sys::SPI_OK_SELECT as i32 || pg_sys::SPI_processed != 1 {
                error!("fraiseql_obs: change tracking could not read the row (SPI code {rc})");
            }
            let table = &*pg_sys::SPI_tuptable;
            let row = *table.vals;
            let col = |n: i32| {
                let mut isnull = false;
                let d = pg_sys::SPI_getbinval(row, table.tupdesc, n, &mut isnull);
                (!isnull).then_some(d)
            };
            let b = col(1).map(|d| pg_sys::pg_detoast_datum_copy(d.cast_mut_ptr()));
            let a = col(2).map(|d| pg_sys::pg_detoast_datum_copy(d.cast_mut_ptr()));
            let owner = col(3).map(|d| pg_sys::Oid::from(d.value() as u32));
            (b, a, owner)
        };
        let Some(owner) = owner else {
            error!("fraiseql_obs: the extension is not installed");
        };

        // 2. the INSERT, as the extension's owner
        let sql = CString::new(format!(
            "INSERT INTO {schema}.tb_entity_change_log \
               (entity_name, entity_id, change_type, before_data, after_data, trace_id, span_id) \
             SELECT $1, (SELECT string_agg(coalesce($4, $3) ->> k, ',' ORDER BY i) \
                           FROM unnest($5::text[]) WITH ORDINALITY AS pk(k, i)), \
                    $2, $3, $4, \
                    nullif(current_setting('fraiseql_obs.trace_id', true), ''), \
                    nullif(current_setting('fraiseql_obs.span_id', true), '') \
              WHERE NOT ($2 = 'update' AND $3 = $4)"
        ))
        .unwrap_or_default();
        let keys_datum = keys.to_vec().into_datum();
        let mut types = [
            pg_sys::TEXTOID,
            pg_sys::TEXTOID,
            pg_sys::JSONBOID,
            pg_sys::JSONBOID,
            pg_sys::TEXTARRAYOID,
        ];
        let entity_d = entity.as_str().into_datum();
        let op_d = op.into_datum();
        let vals: [Option<pg_sys::Datum>; 5] = [
            entity_d,
            op_d,
            before_json.map(|p| pg_sys::Datum::from(p)),
            after_json.map(|p| pg_sys::Datum::from(p)),
            keys_datum,
        ];
        let mut values: Vec<pg_sys::Datum> = vals
            .iter()
            .map(|v| v.unwrap_or(pg_sys::Datum::from(0)))
            .collect();
        let nulls: Vec<std::ffi::c_char> = vals
            .iter()
            .map(|v| if v.is_some() { b' ' } else { b'n' } as std::ffi::c_char)
            .collect();
        let rc = crate::run_as::as_role(owner, &[(c"search_path", c"pg_catalog, pg_temp")], || {
            pg_sys::SPI_execute_with_args(
                sql.as_ptr(),
                5,
                types.as_mut_ptr(),
                values.as_mut_ptr(),
                nulls.as_ptr(),
                false,
                0,
            )
        });
        if rc != pg_sys::SPI_OK_INSERT as i32 {
            error!("fraiseql_obs: change tracking could not write the change log (SPI code {rc})");
        }
        pg_sys::SPI_finish();
        // an AFTER trigger's result is ignored
        pg_sys::Datum::from(0)
    }
}
