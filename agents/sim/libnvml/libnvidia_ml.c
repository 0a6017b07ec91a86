/*
 * A simulated libnvidia-ml.so.1: NVML's C ABI, compiled against NVIDIA's own nvml.h, serving
 * the hardware that gpuledger's scenario engine describes.
 *
 * The Python side (agents/sim/libnvml/feed.py) writes what the GPUs look like into a file that
 * this library maps (GPULEDGER_SIMNVML_STATE names it); the layout comes from
 * agents/sim/libnvml/layout.py as the generated header simnvml_state.h. Every call reads that
 * shared state under a seqlock, so an unchanged pynvml (ctypes, versioned symbols, two-call
 * buffer protocols, NVML_ERROR_* codes) runs exactly as it would against a driver.
 *
 * Semantics follow nvml.h: MIG devices report no utilization, power or temperature; per-process
 * utilization returns only samples newer than lastSeenTimeStamp (NOT_FOUND when none) and is
 * not supported in MIG mode; process lists use the count-then-fill protocol.
 */

#define __NVML_API_VERSION_INTERNAL /* export the versioned names, as the real library does */
#include <nvml.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include "simnvml_state.h"

#define STATE_ENV "GPULEDGER_SIMNVML_STATE"

struct nvmlDevice_st {
    int gpu;
    int mig; /* -1: the GPU itself */
};

static struct nvmlDevice_st handles[SIM_MAX_GPUS][SIM_MAX_MIG + 1];
static pthread_mutex_t init_lock = PTHREAD_MUTEX_INITIALIZER;
static int init_count;
static SimState *state;

/* ---- helpers ---------------------------------------------------------------------------- */

static void copy_string(char *out, size_t out_len, const char *in, size_t in_len) {
    size_t n = strnlen(in, in_len);
    if (n >= out_len) n = out_len - 1;
    memcpy(out, in, n);
    out[n] = '\0';
}

static nvmlReturn_t put_string(char *out, unsigned int length, const char *value) {
    if (out == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(value) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(out, value);
    return NVML_SUCCESS;
}

static unsigned long long now_us(const SimWorld *w) {
    if (w->clock_us) return w->clock_us;
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (unsigned long long)tv.tv_sec * 1000000ULL + (unsigned long long)tv.tv_usec;
}

/* How many GPUs the world has, within what the state can hold. */
static uint32_t gpus_in(const SimWorld *w) {
    return w->gpu_count < SIM_MAX_GPUS ? w->gpu_count : SIM_MAX_GPUS;
}

static nvmlDevice_t handle_of(int gpu, int mig) {
    handles[gpu][mig + 1].gpu = gpu;
    handles[gpu][mig + 1].mig = mig;
    return &handles[gpu][mig + 1];
}

/* Which (gpu, mig) a handle names, or -1 when it is not one of ours. */
static int decode(nvmlDevice_t device, int *gpu, int *mig) {
    const char *base = (const char *)&handles[0][0];
    const char *p = (const char *)device;
    if (p < base || p >= base + sizeof(handles)) return -1;
    if ((size_t)(p - base) % sizeof(struct nvmlDevice_st) != 0) return -1;
    size_t slot = (size_t)(p - base) / sizeof(struct nvmlDevice_st);
    *gpu = (int)(slot / (SIM_MAX_MIG + 1));
    *mig = (int)(slot % (SIM_MAX_MIG + 1)) - 1;
    return 0;
}

/*
 * One NVML call: the library is initialised, the handle (if any) names a device of the
 * active world, `body` reads the world into `out` under the seqlock; then injected faults
 * and the world switch apply.
 */
typedef nvmlReturn_t (*Body)(const SimWorld *w, int gpu, int mig, void *out);

static nvmlReturn_t call(const char *function, int uses_device, nvmlDevice_t device, Body body,
                         void *out) {
    if (init_count == 0 || state == NULL) return NVML_ERROR_UNINITIALIZED;
    int gpu = -1, mig = -1;
    if (uses_device && decode(device, &gpu, &mig) != 0) return NVML_ERROR_INVALID_ARGUMENT;
    char uuid[96] = "";
    nvmlReturn_t ret;
    for (;;) {
        uint64_t seq = __atomic_load_n(&state->seq, __ATOMIC_ACQUIRE);
        if (seq & 1) {
            sched_yield();
            continue;
        }
        const SimWorld *w = &state->worlds[__atomic_load_n(&state->active, __ATOMIC_ACQUIRE) & 1];
        ret = NVML_SUCCESS;
        uuid[0] = '\0';
        if (uses_device) {
            if ((unsigned)gpu >= gpus_in(w)) {
                ret = NVML_ERROR_INVALID_ARGUMENT;
            } else if (mig >= 0) {
                const SimGpu *g = &w->gpus[gpu];
                if (!g->mig_enabled || (unsigned)mig >= g->mig_count || mig >= SIM_MAX_MIG)
                    ret = NVML_ERROR_INVALID_ARGUMENT;
                else
                    copy_string(uuid, sizeof uuid, g->mig[mig].uuid, sizeof g->mig[mig].uuid);
            } else {
                copy_string(uuid, sizeof uuid, w->gpus[gpu].uuid, sizeof w->gpus[gpu].uuid);
            }
        }
        if (ret == NVML_SUCCESS && body != NULL) ret = body(w, gpu, mig, out);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&state->seq, __ATOMIC_RELAXED) == seq) break;
    }
    uint32_t faults = state->fault_count < SIM_MAX_FAULTS ? state->fault_count : SIM_MAX_FAULTS;
    for (uint32_t i = 0; i < faults; i++) {
        SimFault *f = &state->faults[i];
        if (strncmp(f->function, function, sizeof f->function) != 0) continue;
        if (f->uuid[0] != '\0' && strncmp(f->uuid, uuid, sizeof f->uuid) != 0) continue;
        int32_t left = __atomic_load_n(&f->remaining, __ATOMIC_ACQUIRE);
        if (left == 0) continue;
        if (left > 0) __atomic_fetch_sub(&f->remaining, 1, __ATOMIC_ACQ_REL);
        ret = (nvmlReturn_t)f->code;
        break;
    }
    if (state->switch_function[0] != '\0' &&
        strncmp(state->switch_function, function, sizeof state->switch_function) == 0 &&
        __atomic_load_n(&state->switch_after, __ATOMIC_ACQUIRE) > 0 &&
        __atomic_sub_fetch(&state->switch_after, 1, __ATOMIC_ACQ_REL) == 0) {
        __atomic_store_n(&state->active, state->active ^ 1u, __ATOMIC_RELEASE);
    }
    __atomic_fetch_add(&state->calls, 1, __ATOMIC_RELAXED);
    return ret;
}

/* ---- initialisation ----------------------------------------------------------------------- */

static nvmlReturn_t attach(void) {
    const char *path = getenv(STATE_ENV);
    if (path == NULL || path[0] == '\0') {
        fprintf(stderr, "simulated libnvidia-ml: %s is not set: no simulated GPUs to serve\n",
                STATE_ENV);
        return NVML_ERROR_DRIVER_NOT_LOADED;
    }
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "simulated libnvidia-ml: cannot open %s=%s: %s\n", STATE_ENV, path,
                strerror(errno));
        return NVML_ERROR_DRIVER_NOT_LOADED;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || (size_t)st.st_size < sizeof(SimState)) {
        fprintf(stderr, "simulated libnvidia-ml: %s is %lld bytes, expected %zu\n", path,
                (long long)st.st_size, sizeof(SimState));
        close(fd);
        return NVML_ERROR_DRIVER_NOT_LOADED;
    }
    void *map = mmap(NULL, sizeof(SimState), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return NVML_ERROR_OPERATING_SYSTEM;
    SimState *s = map;
    if (s->magic != SIM_MAGIC || s->layout_version != SIM_LAYOUT_VERSION) {
        fprintf(stderr,
                "simulated libnvidia-ml: %s has layout %u, this library reads %u: rebuild it\n",
                path, s->layout_version, SIM_LAYOUT_VERSION);
        munmap(map, sizeof(SimState));
        return NVML_ERROR_LIB_RM_VERSION_MISMATCH;
    }
    state = s;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    pthread_mutex_lock(&init_lock);
    nvmlReturn_t ret = NVML_SUCCESS;
    if (init_count == 0) ret = attach();
    if (ret == NVML_SUCCESS) init_count++;
    pthread_mutex_unlock(&init_lock);
    return ret;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&init_lock);
    nvmlReturn_t ret = NVML_SUCCESS;
    if (init_count == 0) {
        ret = NVML_ERROR_UNINITIALIZED;
    } else if (--init_count == 0) {
        munmap(state, sizeof(SimState));
        state = NULL;
    }
    pthread_mutex_unlock(&init_lock);
    return ret;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
        case NVML_SUCCESS: return "Success";
        case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
        case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
        case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
        case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
        case NVML_ERROR_ALREADY_INITIALIZED: return "Already Initialized";
        case NVML_ERROR_NOT_FOUND: return "Not Found";
        case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
        case NVML_ERROR_INSUFFICIENT_POWER: return "Insufficient External Power";
        case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
        case NVML_ERROR_TIMEOUT: return "Timeout";
        case NVML_ERROR_IRQ_ISSUE: return "Interrupt request issue";
        case NVML_ERROR_LIBRARY_NOT_FOUND: return "NVML Shared Library Not Found";
        case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
        case NVML_ERROR_CORRUPTED_INFOROM: return "Corrupted infoROM";
        case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
        case NVML_ERROR_RESET_REQUIRED: return "GPU requires restart";
        case NVML_ERROR_OPERATING_SYSTEM: return "The operating system has blocked the request.";
        case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "RM has detected an NVML/RM version mismatch.";
        case NVML_ERROR_IN_USE: return "In use by another client";
        case NVML_ERROR_MEMORY: return "Insufficient Memory";
        case NVML_ERROR_NO_DATA: return "No data";
        case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Version mismatch";
        case NVML_ERROR_NOT_READY: return "Not ready";
        case NVML_ERROR_GPU_NOT_FOUND: return "GPU not found";
        default: return "Unknown Error";
    }
}

/* ---- system ------------------------------------------------------------------------------- */

typedef struct {
    char text[256];
    unsigned int value;
    unsigned long long value64;
} Scalar;

static nvmlReturn_t body_driver(const SimWorld *w, int gpu, int mig, void *out) {
    (void)gpu;
    (void)mig;
    copy_string(((Scalar *)out)->text, sizeof((Scalar *)out)->text, w->driver_version,
                sizeof w->driver_version);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    Scalar s;
    nvmlReturn_t ret = call("nvmlSystemGetDriverVersion", 0, NULL, body_driver, &s);
    return ret == NVML_SUCCESS ? put_string(version, length, s.text) : ret;
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    nvmlReturn_t ret = call("nvmlSystemGetNVMLVersion", 0, NULL, NULL, NULL);
    return ret == NVML_SUCCESS ? put_string(version, length, "13.0.0-gpuledger-sim") : ret;
}

typedef struct {
    unsigned int pid;
    char name[64];
} ProcessName;

static nvmlReturn_t body_process_name(const SimWorld *w, int gpu, int mig, void *out) {
    (void)gpu;
    (void)mig;
    ProcessName *p = out;
    for (const SimGpu *g = w->gpus; g < w->gpus + gpus_in(w); g++) {
        for (uint32_t j = 0; j < g->process_count && j < SIM_MAX_PROCS; j++) {
            if (g->processes[j].pid == p->pid) {
                copy_string(p->name, sizeof p->name, g->processes[j].name,
                            sizeof g->processes[j].name);
                return NVML_SUCCESS;
            }
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

nvmlReturn_t nvmlSystemGetProcessName(unsigned int pid, char *name, unsigned int length) {
    ProcessName p = {.pid = pid};
    nvmlReturn_t ret = call("nvmlSystemGetProcessName", 0, NULL, body_process_name, &p);
    if (ret != NVML_SUCCESS) return ret;
    if (name == NULL || length == 0) return NVML_ERROR_INVALID_ARGUMENT;
    copy_string(name, length, p.name, sizeof p.name); /* NVML truncates process names */
    return NVML_SUCCESS;
}

/* ---- devices -------------------------------------------------------------------------------- */

static nvmlReturn_t body_count(const SimWorld *w, int gpu, int mig, void *out) {
    (void)gpu;
    (void)mig;
    ((Scalar *)out)->value = gpus_in(w);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount) {
    if (deviceCount == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    Scalar s;
    nvmlReturn_t ret = call("nvmlDeviceGetCount_v2", 0, NULL, body_count, &s);
    if (ret == NVML_SUCCESS) *deviceCount = s.value;
    return ret;
}

nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount) {
    return nvmlDeviceGetCount_v2(deviceCount);
}

static nvmlReturn_t body_handle_by_index(const SimWorld *w, int gpu, int mig, void *out) {
    (void)gpu;
    (void)mig;
    Scalar *s = out;
    return s->value < gpus_in(w) ? NVML_SUCCESS : NVML_ERROR_INVALID_ARGUMENT;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (device == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    Scalar s = {.value = index};
    nvmlReturn_t ret = call("nvmlDeviceGetHandleByIndex_v2", 0, NULL, body_handle_by_index, &s);
    if (ret == NVML_SUCCESS) *device = handle_of((int)index, -1);
    return ret;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

typedef struct {
    char uuid[96];
    int gpu;
    int mig;
} UuidLookup;

static nvmlReturn_t body_handle_by_uuid(const SimWorld *w, int gpu, int mig, void *out) {
    (void)gpu;
    (void)mig;
    UuidLookup *u = out;
    for (uint32_t i = 0; i < gpus_in(w); i++) {
        const SimGpu *g = &w->gpus[i];
        uint32_t migs = !g->mig_enabled ? 0 : g->mig_count < SIM_MAX_MIG ? g->mig_count : SIM_MAX_MIG;
        for (int j = -1; j < (int)migs; j++) { /* the GPU itself (-1, as in a handle), its MIGs */
            if (strncmp(j < 0 ? g->uuid : g->mig[j].uuid, u->uuid, sizeof u->uuid) == 0) {
                u->gpu = (int)i;
                u->mig = j;
                return NVML_SUCCESS;
            }
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    if (uuid == NULL || device == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    UuidLookup u;
    copy_string(u.uuid, sizeof u.uuid, uuid, sizeof u.uuid);
    nvmlReturn_t ret = call("nvmlDeviceGetHandleByUUID", 0, NULL, body_handle_by_uuid, &u);
    if (ret == NVML_SUCCESS) *device = handle_of(u.gpu, u.mig);
    return ret;
}

static nvmlReturn_t body_name(const SimWorld *w, int gpu, int mig, void *out) {
    Scalar *s = out;
    const SimGpu *g = &w->gpus[gpu];
    if (mig < 0) {
        copy_string(s->text, sizeof s->text, g->name, sizeof g->name);
    } else {
        char name[96], profile[32];
        copy_string(name, sizeof name, g->name, sizeof g->name);
        copy_string(profile, sizeof profile, g->mig[mig].profile, sizeof g->mig[mig].profile);
        snprintf(s->text, sizeof s->text, "%s MIG %s", name, profile);
    }
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    Scalar s;
    nvmlReturn_t ret = call("nvmlDeviceGetName", 1, device, body_name, &s);
    return ret == NVML_SUCCESS ? put_string(name, length, s.text) : ret;
}

static nvmlReturn_t body_uuid(const SimWorld *w, int gpu, int mig, void *out) {
    Scalar *s = out;
    const SimGpu *g = &w->gpus[gpu];
    if (mig < 0)
        copy_string(s->text, sizeof s->text, g->uuid, sizeof g->uuid);
    else
        copy_string(s->text, sizeof s->text, g->mig[mig].uuid, sizeof g->mig[mig].uuid);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    Scalar s;
    nvmlReturn_t ret = call("nvmlDeviceGetUUID", 1, device, body_uuid, &s);
    return ret == NVML_SUCCESS ? put_string(uuid, length, s.text) : ret;
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    if (index == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t ret = call("nvmlDeviceGetIndex", 1, device, NULL, NULL);
    if (ret == NVML_SUCCESS) *index = (unsigned)(device->mig < 0 ? device->gpu : device->mig);
    return ret;
}

typedef struct {
    unsigned long long total, used;
} Memory;

static nvmlReturn_t body_memory(const SimWorld *w, int gpu, int mig, void *out) {
    Memory *m = out;
    const SimGpu *g = &w->gpus[gpu];
    if (mig < 0) {
        m->total = g->memory_total;
        m->used = g->memory_used;
    } else {
        m->total = g->mig[mig].memory_total;
        m->used = g->mig[mig].memory_used;
    }
    return NVML_SUCCESS;
}

/* Total, used and free bytes, into the fields of either version of nvmlMemory_t. */
static nvmlReturn_t memory_call(const char *function, nvmlDevice_t device,
                                unsigned long long *total, unsigned long long *used,
                                unsigned long long *unused) {
    Memory m;
    nvmlReturn_t ret = call(function, 1, device, body_memory, &m);
    if (ret == NVML_SUCCESS) {
        *total = m.total;
        *used = m.used;
        *unused = m.total - m.used;
    }
    return ret;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    if (memory == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    return memory_call("nvmlDeviceGetMemoryInfo", device, &memory->total, &memory->used,
                       &memory->free);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    if (memory == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != nvmlMemory_v2) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    nvmlReturn_t ret = memory_call("nvmlDeviceGetMemoryInfo_v2", device, &memory->total,
                                   &memory->used, &memory->free);
    if (ret == NVML_SUCCESS) memory->reserved = 0;
    return ret;
}

/* Utilization, power and temperature: the whole GPU only; utilization not in MIG mode. */
enum { F_UTIL, F_POWER, F_POWER_LIMIT, F_TEMP };

static nvmlReturn_t gpu_only(const SimWorld *w, int gpu, int mig, Scalar *s, int field) {
    const SimGpu *g = &w->gpus[gpu];
    if (mig >= 0) return NVML_ERROR_NOT_SUPPORTED;
    switch (field) {
        case F_UTIL:
            if (g->mig_enabled) return NVML_ERROR_NOT_SUPPORTED;
            s->value = g->util_gpu;
            s->value64 = g->util_mem;
            return NVML_SUCCESS;
        case F_POWER: s->value = g->power_mw; return NVML_SUCCESS;
        case F_POWER_LIMIT: s->value = g->power_limit_mw; return NVML_SUCCESS;
        default: s->value = g->temp_c; return NVML_SUCCESS;
    }
}

static nvmlReturn_t body_util(const SimWorld *w, int gpu, int mig, void *out) {
    return gpu_only(w, gpu, mig, out, F_UTIL);
}
static nvmlReturn_t body_power(const SimWorld *w, int gpu, int mig, void *out) {
    return gpu_only(w, gpu, mig, out, F_POWER);
}
static nvmlReturn_t body_power_limit(const SimWorld *w, int gpu, int mig, void *out) {
    return gpu_only(w, gpu, mig, out, F_POWER_LIMIT);
}
static nvmlReturn_t body_temp(const SimWorld *w, int gpu, int mig, void *out) {
    return gpu_only(w, gpu, mig, out, F_TEMP);
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    if (utilization == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    Scalar s;
    nvmlReturn_t ret = call("nvmlDeviceGetUtilizationRates", 1, device, body_util, &s);
    if (ret == NVML_SUCCESS) {
        utilization->gpu = s.value;
        utilization->memory = (unsigned int)s.value64;
    }
    return ret;
}

static nvmlReturn_t scalar_call(const char *function, nvmlDevice_t device, Body body,
                                unsigned int *value) {
    if (value == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    Scalar s;
    nvmlReturn_t ret = call(function, 1, device, body, &s);
    if (ret == NVML_SUCCESS) *value = s.value;
    return ret;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power) {
    return scalar_call("nvmlDeviceGetPowerUsage", device, body_power, power);
}

nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit) {
    return scalar_call("nvmlDeviceGetEnforcedPowerLimit", device, body_power_limit, limit);
}

nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit) {
    return scalar_call("nvmlDeviceGetPowerManagementLimit", device, body_power_limit, limit);
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, nvmlTemperatureSensors_t sensorType,
                                      unsigned int *temp) {
    if (sensorType != NVML_TEMPERATURE_GPU) return NVML_ERROR_INVALID_ARGUMENT;
    return scalar_call("nvmlDeviceGetTemperature", device, body_temp, temp);
}

/* ---- processes ------------------------------------------------------------------------------ */

typedef struct {
    uint32_t kind;
    unsigned int capacity; /* what the caller's array holds */
    unsigned int count;    /* how many there are */
    nvmlProcessInfo_t infos[SIM_MAX_PROCS];
} ProcessList;

static nvmlReturn_t body_processes(const SimWorld *w, int gpu, int mig, void *out) {
    ProcessList *p = out;
    const SimGpu *g = &w->gpus[gpu];
    p->count = 0;
    for (uint32_t i = 0; i < g->process_count && i < SIM_MAX_PROCS; i++) {
        const SimProcess *proc = &g->processes[i];
        if (proc->kind != p->kind) continue;
        if (mig >= 0 && proc->mig != mig) continue;
        nvmlProcessInfo_t *info = &p->infos[p->count++];
        info->pid = proc->pid;
        info->usedGpuMemory = proc->used_memory;
        if (g->mig_enabled && proc->mig >= 0 && proc->mig < SIM_MAX_MIG) {
            info->gpuInstanceId = g->mig[proc->mig].gpu_instance_id;
            info->computeInstanceId = 0;
        } else {
            info->gpuInstanceId = 0xFFFFFFFFu;
            info->computeInstanceId = 0xFFFFFFFFu;
        }
    }
    return NVML_SUCCESS;
}

static nvmlReturn_t running_processes(const char *function, uint32_t kind, nvmlDevice_t device,
                                      unsigned int *infoCount, nvmlProcessInfo_t *infos) {
    if (infoCount == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    ProcessList *p = malloc(sizeof *p);
    if (p == NULL) return NVML_ERROR_MEMORY;
    p->kind = kind;
    nvmlReturn_t ret = call(function, 1, device, body_processes, p);
    if (ret == NVML_SUCCESS) {
        if (p->count == 0) {
            *infoCount = 0;
        } else if (*infoCount < p->count || infos == NULL) {
            *infoCount = p->count;
            ret = NVML_ERROR_INSUFFICIENT_SIZE;
        } else {
            memcpy(infos, p->infos, p->count * sizeof *infos);
            *infoCount = p->count;
        }
    }
    free(p);
    return ret;
}

#ifndef SIMNVML_OLD_DRIVER
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                     nvmlProcessInfo_t *infos) {
    return running_processes("nvmlDeviceGetComputeRunningProcesses_v3", SIM_KIND_COMPUTE, device,
                             infoCount, infos);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device,
                                                      unsigned int *infoCount,
                                                      nvmlProcessInfo_t *infos) {
    return running_processes("nvmlDeviceGetGraphicsRunningProcesses_v3", SIM_KIND_GRAPHICS,
                             device, infoCount, infos);
}
#endif

/* Drivers before R510 export only _v2 (same structure as _v3 in nvml.h): build with
 * -DSIMNVML_OLD_DRIVER to leave _v3 out. */
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *infoCount,
                                                     nvmlProcessInfo_v2_t *infos) {
    return running_processes("nvmlDeviceGetComputeRunningProcesses_v2", SIM_KIND_COMPUTE, device,
                             infoCount, (nvmlProcessInfo_t *)infos);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v2(nvmlDevice_t device,
                                                      unsigned int *infoCount,
                                                      nvmlProcessInfo_v2_t *infos) {
    return running_processes("nvmlDeviceGetGraphicsRunningProcesses_v2", SIM_KIND_GRAPHICS,
                             device, infoCount, (nvmlProcessInfo_t *)infos);
}

typedef struct {
    unsigned long long last_seen;
    unsigned int count;
    unsigned int quirks;
    nvmlProcessUtilizationSample_t samples[SIM_MAX_SAMPLES];
} UtilList;

static nvmlReturn_t body_process_util(const SimWorld *w, int gpu, int mig, void *out) {
    UtilList *u = out;
    const SimGpu *g = &w->gpus[gpu];
    if (mig >= 0 || g->mig_enabled) return NVML_ERROR_NOT_SUPPORTED;
    unsigned long long now = now_us(w);
    u->quirks = w->quirks;
    u->count = 0;
    for (uint32_t i = 0; i < g->sample_count && i < SIM_MAX_SAMPLES; i++) {
        const SimUtilSample *s = &g->samples[i];
        if (s->ts_us > now) continue; /* not sampled yet */
        if (s->ts_us <= u->last_seen && !(w->quirks & SIM_QUIRK_UTIL_IGNORES_LAST_SEEN)) continue;
        nvmlProcessUtilizationSample_t *o = &u->samples[u->count++];
        o->pid = s->pid;
        o->timeStamp = s->ts_us;
        o->smUtil = s->sm_util;
        o->memUtil = s->mem_util;
        o->encUtil = 0;
        o->decUtil = 0;
    }
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t device,
                                             nvmlProcessUtilizationSample_t *utilization,
                                             unsigned int *processSamplesCount,
                                             unsigned long long lastSeenTimeStamp) {
    if (processSamplesCount == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    UtilList *u = malloc(sizeof *u);
    if (u == NULL) return NVML_ERROR_MEMORY;
    u->last_seen = lastSeenTimeStamp;
    nvmlReturn_t ret = call("nvmlDeviceGetProcessUtilization", 1, device, body_process_util, u);
    if (ret == NVML_SUCCESS) {
        unsigned int n = u->count;
        unsigned int first = 0;
        if ((u->quirks & SIM_QUIRK_UTIL_COUNT_IS_CAPACITY) && n > SIM_UTIL_CAPACITY) {
            first = n - SIM_UTIL_CAPACITY; /* the driver's ring keeps the newest */
            n = SIM_UTIL_CAPACITY;
        }
        if (utilization == NULL) {
            /* asking for the size: drivers in the field answer with their buffer's capacity */
            if (n == 0 && !(u->quirks & SIM_QUIRK_UTIL_COUNT_IS_CAPACITY)) {
                ret = NVML_ERROR_NOT_FOUND;
            } else {
                *processSamplesCount =
                    (u->quirks & SIM_QUIRK_UTIL_COUNT_IS_CAPACITY) ? SIM_UTIL_CAPACITY : n;
                ret = NVML_ERROR_INSUFFICIENT_SIZE;
            }
        } else if (n == 0) {
            ret = NVML_ERROR_NOT_FOUND;
        } else if (*processSamplesCount < n) {
            *processSamplesCount = n;
            ret = NVML_ERROR_INSUFFICIENT_SIZE;
        } else {
            for (unsigned int i = 0; i < n; i++) {
                unsigned int from = (u->quirks & SIM_QUIRK_UTIL_UNSORTED) ? first + n - 1 - i
                                                                          : first + i;
                utilization[i] = u->samples[from];
            }
            *processSamplesCount = n;
        }
    }
    free(u);
    return ret;
}

/* ---- MIG ----------------------------------------------------------------------------------- */

static nvmlReturn_t body_mig_mode(const SimWorld *w, int gpu, int mig, void *out) {
    const SimGpu *g = &w->gpus[gpu];
    if (mig >= 0) return NVML_ERROR_NOT_SUPPORTED;
    if (g->max_mig == 0) return NVML_ERROR_NOT_SUPPORTED;
    ((Scalar *)out)->value = g->mig_enabled ? NVML_DEVICE_MIG_ENABLE : NVML_DEVICE_MIG_DISABLE;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *currentMode,
                                  unsigned int *pendingMode) {
    if (currentMode == NULL || pendingMode == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    Scalar s;
    nvmlReturn_t ret = call("nvmlDeviceGetMigMode", 1, device, body_mig_mode, &s);
    if (ret == NVML_SUCCESS) *currentMode = *pendingMode = s.value;
    return ret;
}

static nvmlReturn_t body_max_mig(const SimWorld *w, int gpu, int mig, void *out) {
    const SimGpu *g = &w->gpus[gpu];
    if (mig >= 0) return NVML_ERROR_INVALID_ARGUMENT;
    ((Scalar *)out)->value = g->mig_enabled ? g->max_mig : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count) {
    return scalar_call("nvmlDeviceGetMaxMigDeviceCount", device, body_max_mig, count);
}

static nvmlReturn_t body_mig_handle(const SimWorld *w, int gpu, int mig, void *out) {
    const SimGpu *g = &w->gpus[gpu];
    unsigned int index = ((Scalar *)out)->value;
    if (mig >= 0 || !g->mig_enabled || index >= g->max_mig) return NVML_ERROR_INVALID_ARGUMENT;
    if (index >= g->mig_count || index >= SIM_MAX_MIG) return NVML_ERROR_NOT_FOUND;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index,
                                                 nvmlDevice_t *migDevice) {
    if (migDevice == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    Scalar s = {.value = index};
    nvmlReturn_t ret = call("nvmlDeviceGetMigDeviceHandleByIndex", 1, device, body_mig_handle, &s);
    if (ret == NVML_SUCCESS) *migDevice = handle_of(device->gpu, (int)index);
    return ret;
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *isMigDevice) {
    if (isMigDevice == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t ret = call("nvmlDeviceIsMigDeviceHandle", 1, device, NULL, NULL);
    if (ret == NVML_SUCCESS) *isMigDevice = device->mig >= 0;
    return ret;
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t migDevice,
                                                          nvmlDevice_t *device) {
    if (device == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t ret = call("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", 1, migDevice, NULL, NULL);
    if (ret == NVML_SUCCESS && migDevice->mig < 0) ret = NVML_ERROR_INVALID_ARGUMENT;
    if (ret == NVML_SUCCESS) *device = handle_of(migDevice->gpu, -1);
    return ret;
}

static nvmlReturn_t body_instance_id(const SimWorld *w, int gpu, int mig, void *out) {
    if (mig < 0) return NVML_ERROR_INVALID_ARGUMENT;
    ((Scalar *)out)->value = w->gpus[gpu].mig[mig].gpu_instance_id;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t device, unsigned int *id) {
    return scalar_call("nvmlDeviceGetGpuInstanceId", device, body_instance_id, id);
}

nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t device, unsigned int *id) {
    if (id == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t ret = call("nvmlDeviceGetComputeInstanceId", 1, device, NULL, NULL);
    if (ret == NVML_SUCCESS && device->mig < 0) ret = NVML_ERROR_INVALID_ARGUMENT;
    if (ret == NVML_SUCCESS) *id = 0;
    return ret;
}

static nvmlReturn_t body_attributes(const SimWorld *w, int gpu, int mig, void *out) {
    nvmlDeviceAttributes_t *a = out;
    const SimGpu *g = &w->gpus[gpu];
    unsigned int slices = mig < 0 ? (g->max_mig ? g->max_mig : 1) : g->mig[mig].slices;
    unsigned long long memory = mig < 0 ? g->memory_total : g->mig[mig].memory_total;
    memset(a, 0, sizeof *a);
    a->gpuInstanceSliceCount = slices;
    a->computeInstanceSliceCount = slices;
    a->multiprocessorCount = 14 * slices;
    a->memorySizeMB = memory / (1024ULL * 1024ULL);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetAttributes_v2(nvmlDevice_t device, nvmlDeviceAttributes_t *attributes) {
    if (attributes == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlDeviceAttributes_t a;
    nvmlReturn_t ret = call("nvmlDeviceGetAttributes_v2", 1, device, body_attributes, &a);
    if (ret == NVML_SUCCESS) *attributes = a;
    return ret;
}

/* ---- GPU Performance Monitoring (GPM) ------------------------------------------------------
 * A sample copies a device's counters (activity integrated over time) and the time they stand
 * at; nvmlGpmMetricsGet divides the difference of two samples by the time between them, as
 * the driver does with its hardware counters. Supported where the world says so (Hopper and
 * later); a MIG instance is sampled through its parent and its GPU instance id.
 */

#define GPM_SAMPLE_MAGIC 0x47504D53u /* "SMPG" */

struct nvmlGpmSample_st {
    uint32_t magic;
    int filled;
    int gpu;
    int mig;
    uint64_t time_us;
    SimGpm gpm;
};

static const unsigned int gpm_metrics[SIM_GPM_METRIC_COUNT] = SIM_GPM_METRIC_IDS;

static nvmlReturn_t body_gpm_support(const SimWorld *w, int gpu, int mig, void *out) {
    (void)mig;
    ((Scalar *)out)->value = w->gpus[gpu].gpm_supported ? 1 : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlGpmQueryDeviceSupport(nvmlDevice_t device, nvmlGpmSupport_t *gpmSupport) {
    if (gpmSupport == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (gpmSupport->version != NVML_GPM_SUPPORT_VERSION) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    Scalar s;
    nvmlReturn_t ret = call("nvmlGpmQueryDeviceSupport", 1, device, body_gpm_support, &s);
    if (ret == NVML_SUCCESS) gpmSupport->isSupportedDevice = s.value;
    return ret;
}

nvmlReturn_t nvmlGpmSampleAlloc(nvmlGpmSample_t *gpmSample) {
    if (gpmSample == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    struct nvmlGpmSample_st *s = calloc(1, sizeof *s);
    if (s == NULL) return NVML_ERROR_MEMORY;
    s->magic = GPM_SAMPLE_MAGIC;
    *gpmSample = s;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlGpmSampleFree(nvmlGpmSample_t gpmSample) {
    if (gpmSample == NULL || gpmSample->magic != GPM_SAMPLE_MAGIC) return NVML_ERROR_INVALID_ARGUMENT;
    gpmSample->magic = 0;
    free(gpmSample);
    return NVML_SUCCESS;
}

typedef struct {
    unsigned int instance_id; /* 0: the GPU itself */
    struct nvmlGpmSample_st *sample;
} GpmRequest;

static nvmlReturn_t body_gpm_sample(const SimWorld *w, int gpu, int mig, void *out) {
    GpmRequest *r = out;
    const SimGpu *g = &w->gpus[gpu];
    if (mig >= 0) return NVML_ERROR_INVALID_ARGUMENT; /* MIG: the parent and an instance id */
    if (!g->gpm_supported) return NVML_ERROR_NOT_SUPPORTED;
    const SimGpm *counters = &g->gpm;
    int found = -1;
    if (r->instance_id != 0) {
        for (uint32_t i = 0; i < g->mig_count && i < SIM_MAX_MIG; i++)
            if (g->mig[i].gpu_instance_id == r->instance_id) found = (int)i;
        if (!g->mig_enabled || found < 0) return NVML_ERROR_NOT_FOUND;
        counters = &g->mig[found].gpm;
    }
    r->sample->gpu = gpu;
    r->sample->mig = found;
    r->sample->time_us = w->gpm_time_us;
    r->sample->gpm = *counters;
    r->sample->filled = 1;
    return NVML_SUCCESS;
}

static nvmlReturn_t gpm_sample(const char *function, nvmlDevice_t device, unsigned int instance,
                               nvmlGpmSample_t gpmSample) {
    if (gpmSample == NULL || gpmSample->magic != GPM_SAMPLE_MAGIC) return NVML_ERROR_INVALID_ARGUMENT;
    GpmRequest r = {.instance_id = instance, .sample = gpmSample};
    return call(function, 1, device, body_gpm_sample, &r);
}

nvmlReturn_t nvmlGpmSampleGet(nvmlDevice_t device, nvmlGpmSample_t gpmSample) {
    return gpm_sample("nvmlGpmSampleGet", device, 0, gpmSample);
}

nvmlReturn_t nvmlGpmMigSampleGet(nvmlDevice_t device, unsigned int gpuInstanceId,
                                 nvmlGpmSample_t gpmSample) {
    if (gpuInstanceId == 0) return NVML_ERROR_INVALID_ARGUMENT;
    return gpm_sample("nvmlGpmMigSampleGet", device, gpuInstanceId, gpmSample);
}

static nvmlReturn_t body_gpm_metrics(const SimWorld *w, int gpu, int mig, void *out) {
    (void)w;
    (void)gpu;
    (void)mig;
    nvmlGpmMetricsGet_t *m = out;
    const struct nvmlGpmSample_st *a = m->sample1, *b = m->sample2;
    double seconds = b->time_us > a->time_us ? (double)(b->time_us - a->time_us) / 1e6 : 0.0;
    for (unsigned int i = 0; i < m->numMetrics; i++) {
        nvmlGpmMetric_t *metric = &m->metrics[i];
        metric->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
        metric->value = 0.0;
        metric->metricInfo.shortName = metric->metricInfo.longName = metric->metricInfo.unit = NULL;
        for (int k = 0; k < SIM_GPM_METRIC_COUNT; k++) {
            if (metric->metricId != gpm_metrics[k]) continue;
            double fraction = seconds > 0.0 ? (b->gpm.acc[k] - a->gpm.acc[k]) / seconds
                                            : b->gpm.rate[k];
            if (fraction < 0.0) fraction = 0.0;
            if (fraction > 1.0) fraction = 1.0;
            metric->value = 100.0 * fraction;
            metric->nvmlReturn = NVML_SUCCESS;
            metric->metricInfo.unit = "%";
        }
    }
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlGpmMetricsGet(nvmlGpmMetricsGet_t *metricsGet) {
    if (metricsGet == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (metricsGet->version != NVML_GPM_METRICS_GET_VERSION) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    const struct nvmlGpmSample_st *a = metricsGet->sample1, *b = metricsGet->sample2;
    if (a == NULL || b == NULL || a->magic != GPM_SAMPLE_MAGIC || b->magic != GPM_SAMPLE_MAGIC ||
        !a->filled || !b->filled || a->gpu != b->gpu || a->mig != b->mig ||
        metricsGet->numMetrics > NVML_GPM_METRIC_MAX)
        return NVML_ERROR_INVALID_ARGUMENT;
    return call("nvmlGpmMetricsGet", 0, NULL, body_gpm_metrics, metricsGet);
}
