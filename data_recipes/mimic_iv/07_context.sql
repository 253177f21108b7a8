-- Demographics, admission context, prior utilisation and ICU exposure up to t_pred.
-- Inputs: adm, icu, task_windows. Output: context_feats. Nothing here is read after t_pred:
-- prior admissions are counted by admittime before the index admission, ICU time is cut at t_pred.

CREATE OR REPLACE TABLE context_feats AS
WITH prior AS (
    SELECT w.task, w.hadm_id,
        count(p.hadm_id) FILTER (WHERE p.admittime >= w.admittime - INTERVAL 365 DAY
                                   AND p.admittime < w.admittime) AS n_admissions_prev_365d,
        count(p.hadm_id) FILTER (WHERE p.admittime >= w.admittime - INTERVAL 365 DAY
                                   AND p.admittime < w.admittime AND p.edregtime IS NOT NULL)
            AS n_ed_visits_prev_365d,
        max(p.dischtime) FILTER (WHERE p.dischtime <= w.admittime) AS last_discharge
    FROM task_windows w
    LEFT JOIN adm p ON p.subject_id = w.subject_id AND p.hadm_id <> w.hadm_id
    GROUP BY w.task, w.hadm_id
), icu_use AS (
    SELECT w.task, w.hadm_id, count(i.stay_id) AS n_icu_stays,
        coalesce(sum(date_diff('second', i.intime, least(coalesce(i.outtime, w.t_pred), w.t_pred))), 0)
            / 86400.0 AS icu_days
    FROM task_windows w
    LEFT JOIN icu i ON i.hadm_id = w.hadm_id AND i.intime <= w.t_pred
    GROUP BY w.task, w.hadm_id
)
SELECT w.task, w.hadm_id,
    a.age, a.sex, a.admission_type, a.admission_location, a.insurance, a.language, a.marital_status, a.race,
    date_diff('second', w.admittime, w.t_pred) / 86400.0 AS los_days,
    p.n_admissions_prev_365d, p.n_ed_visits_prev_365d,
    date_diff('second', p.last_discharge, w.admittime) / 86400.0 AS days_since_last_discharge,
    u.n_icu_stays, u.icu_days
FROM task_windows w
JOIN adm a ON a.hadm_id = w.hadm_id
JOIN prior p ON p.task = w.task AND p.hadm_id = w.hadm_id
JOIN icu_use u ON u.task = w.task AND u.hadm_id = w.hadm_id;
