// Readiness probe for scripts/kafka.sh, run as a single-file program (`java Probe.java BOOTSTRAP`).
// It sends a real metadata request (describeCluster) so "up" means "serves clients", not merely
// "the port is open". Exit 0 when the broker answers within the timeout, 1 otherwise.
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;

public class Probe {
    public static void main(String[] args) {
        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "3000");
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "5000");
        try (Admin admin = Admin.create(props)) {
            String id = admin.describeCluster().clusterId().get(5, TimeUnit.SECONDS);
            int nodes = admin.describeCluster().nodes().get(5, TimeUnit.SECONDS).size();
            System.out.println("cluster " + id + " serving with " + nodes + " broker(s)");
            System.exit(nodes > 0 ? 0 : 1);
        } catch (Exception e) {
            System.err.println("not ready: " + e.getMessage());
            System.exit(1);
        }
    }
}
